"""The KV block pool: block objects, ref counts, the LRU free list and the prefix-hash table.

This module owns which physical KV blocks exist, who holds them (by count, not by name:
the per-request lists live in `manager.py`) and which full blocks are findable by their
content hash. It never touches tensors; a block is only an index into the per-layer
`k_cache` / `v_cache` tensors of shape `[num_blocks, block_size, num_heads, head_dim]`.

Block layout (num_blocks = 8, block_size = 4)::

    block id   0      1      2      3      4      5      6      7
             +------+------+------+------+------+------+------+------+
             | null | A0   | A1   | B0   | ---- | A2'  | ---- | ---- |
             +------+------+------+------+------+------+------+------+
    ref_cnt    -      2      1      1      0      0      0      0
    hash       -      h0     h1     -      -      h2     -      -
               |      `- shared by requests A and C (prefix hit)
               `- block 0 is never handed out: it pads block tables

    free list (LRU order; allocate from the head, freed blocks go to the tail):

        head <-> [4] <-> [6] <-> [7] <-> [5: h2] <-> tail
                  ^ evicted first               ^ freed last, evicted last

Rules:
  * A block whose ref_cnt drops to 0 goes to the tail of the free list but KEEPS its hash,
    so a later request can still hit it ("cached but free"). A hit removes it from the
    middle of the list in O(1) (`touch`).
  * Eviction is lazy: a cached block loses its hash only when `get_new_blocks` pops it
    because a block is actually needed.
  * The manager frees a request's blocks in reverse order, so the tail of a prompt (the
    least shareable part) is evicted before its head.

Block hashes chain: hash(block i) = H(hash(block i-1), token ids of block i, extra), where
`extra` is everything else that changes the block's K/V (for Qwen-1: the request's dynamic
NTK alpha, passed as the request's `cache_salt`).
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Hashable, Iterable, Optional, Sequence

BlockHash = bytes


def hash_block_tokens(parent_hash: Optional[BlockHash], token_ids: tuple,
                      extra: Hashable = None) -> BlockHash:
    """Chained content hash of one full block: 128 bits of sha256, stable across processes.

    `token_ids` must be a tuple of Python ints and `extra` must be produced the same way for
    equal content (pickle tells `1` from `1.0`): equal inputs give equal hashes, anything
    else collides with probability ~2^-128.
    """
    payload = pickle.dumps((parent_hash, token_ids, extra), protocol=4)
    return hashlib.sha256(payload).digest()[:16]


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, extra: Hashable = None,
                        max_blocks: Optional[int] = None) -> list[BlockHash]:
    """The chained hashes of the full blocks at the start of `token_ids` (at most
    `max_blocks`), exactly as the KV cache computes them for a request whose `cache_salt` is
    `extra`: what a front end compares against what a replica's cache holds."""
    num_blocks = len(token_ids) // block_size
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    hashes: list[BlockHash] = []
    parent = None
    for i in range(num_blocks):
        # int(): numpy ints pickle differently from Python ints and would change the hash.
        block = tuple(int(t) for t in token_ids[i * block_size:(i + 1) * block_size])
        parent = hash_block_tokens(parent, block, extra)
        hashes.append(parent)
    return hashes


class KVBlock:
    """One physical KV block: its id, how many requests hold it, and its content hash."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[BlockHash] = None
        # Links of the free list; both None while the block is not in it.
        self.prev_free: Optional[KVBlock] = None
        self.next_free: Optional[KVBlock] = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove-from-middle."""

    def __init__(self, blocks: Iterable[KVBlock]):
        # Sentinels keep every real node's prev/next non-None while it is in the list,
        # which is also how `__contains__` tells membership in O(1).
        self._head = KVBlock(-1)
        self._tail = KVBlock(-2)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block: KVBlock) -> bool:
        return block.prev_free is not None

    def __iter__(self):
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> KVBlock:
        if self._len == 0:
            raise IndexError("pop from an empty free block queue")
        block = self._head.next_free
        self.remove(block)
        return block


class BlockPool:
    """All KV blocks of one cache: ref counts, the LRU free list and the hash -> block table."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached_blocks: dict[BlockHash, KVBlock] = {}

    # -- counters -------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Usable blocks (the null block excluded)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, cached-but-free ones included (they can be evicted)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.total - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_blocks)

    # -- allocation -----------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Pop `n` blocks from the head of the free list (ref_cnt 1), evicting their hashes."""
        if n > len(self.free_queue):
            raise ValueError(f"cannot allocate {n} blocks: only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block; a free (cached) block leaves the free list."""
        for block in blocks:
            if block.ref_cnt == 0 and block in self.free_queue:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block, in the given order; blocks reaching 0 go to the
        tail of the free list with their hash kept (so they can still be hit)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    # -- prefix cache ---------------------------------------------------------------------
    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Make a full block findable by `block_hash`. Returns False (and leaves the block
        unhashed) if another block already holds that content: the first copy stays the
        canonical one, this one is freed normally later."""
        if not self.enable_prefix_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block
        return True

    def get_cached_block(self, block_hash: BlockHash) -> Optional[KVBlock]:
        return self.cached_blocks.get(block_hash)

    def reset_prefix_cache(self) -> None:
        """Forget every hash (used blocks stay allocated; nothing can be hit afterwards)."""
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None
