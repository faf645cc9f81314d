"""KVCacheManager: which blocks each request holds, prefix-cache lookups and hit-rate stats.

It owns the per-request block lists and block-hash chains on top of a `BlockPool`. The
scheduler drives it; it never touches tensors and never changes the request it is given.

A request needs `.request_id`, `.all_token_ids` (prompt + output), `.num_tokens`,
`.num_computed_tokens` and `.cache_salt` (Qwen's NTK alpha; part of every block hash).

Typical use by the scheduler::

    hit_ids, num_hit_tokens = kv.get_computed_blocks(req)        # waiting request, no blocks
    new_ids = kv.allocate_slots(req, num_new_tokens, hit_ids)   # None: pool short, retry later
    req.num_computed_tokens += num_hit_tokens                    # the scheduler's job
    ...                                                          # step runs num_new_tokens
    kv.free(req)                                                 # finished / preempted
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from .block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens, prefix_block_hashes


@dataclass
class PrefixCacheStats:
    """One query per admission: counted when `allocate_slots` succeeds for a request that holds
    no blocks and has computed nothing (a new or preempted request), with the hits it was
    given. A request that waits at the head of the queue is looked up again every step, but
    counted once, when it gets in. Nothing is counted with prefix caching off."""
    queries: int = 0          # admissions
    hits: int = 0             # admissions that hit at least one block
    query_tokens: int = 0     # sum of request.num_tokens over the admissions
    hit_tokens: int = 0       # sum of the hit blocks' tokens

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass
class _RequestBlocks:
    blocks: list[KVBlock] = field(default_factory=list)
    # hashes[i] is the chained hash of blocks[i]; only the first len(hashes) blocks are
    # full and hashed, so every block is hashed exactly once.
    hashes: list[BlockHash] = field(default_factory=list)
    # Largest computed + new token count the blocks were allocated for.
    num_tokens: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._requests: dict[str, _RequestBlocks] = {}
        self._stats = PrefixCacheStats()
        # (request_id, hashes of the hit blocks) of the last get_computed_blocks call, so that
        # allocate_slots can check its hits without hashing them again.
        self._last_hits: tuple[str, list[BlockHash]] | None = None

    # -- prefix hits ----------------------------------------------------------------------
    def get_computed_blocks(self, request) -> tuple[list[int], int]:
        """Longest run of cached full blocks at the start of the request's tokens.

        Returns (block_ids, num_computed_tokens) with num_computed_tokens =
        len(block_ids) * block_size <= request.num_tokens - 1, so at least one token is
        always left to compute (its logits are needed). Takes no references: pass the ids to
        `allocate_slots` right away, before any other allocation can evict them.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        num_tokens = request.num_tokens
        max_blocks = max(num_tokens - 1, 0) // bs
        tokens = request.all_token_ids
        hit_ids: list[int] = []
        hit_hashes: list[BlockHash] = []
        parent = None
        for i in range(max_blocks):
            parent = hash_block_tokens(parent, _block_tokens(tokens, i, bs), request.cache_salt)
            block = self.pool.get_cached_block(parent)
            if block is None:
                break
            hit_ids.append(block.block_id)
            hit_hashes.append(parent)
        self._last_hits = (request.request_id, hit_hashes)
        return hit_ids, len(hit_ids) * bs

    # -- allocation -----------------------------------------------------------------------
    def allocate_slots(self, request, num_new_tokens: int,
                       new_computed_blocks: Sequence[int] = ()) -> list[int] | None:
        """Claim the prefix-hit blocks and enough new blocks for the tokens of this step.

        `request.num_computed_tokens` is the count BEFORE the hits: after this call the
        request's blocks cover request.num_computed_tokens + len(new_computed_blocks) *
        block_size + num_new_tokens tokens. Hits are only accepted for a request that holds
        no blocks and has computed nothing (a new or preempted request).

        Returns the ids of the newly allocated blocks (hit blocks excluded; possibly []), or
        None, changing nothing, when the free pool cannot supply them (a cached-but-free hit
        block counts against the pool too, since claiming it takes it off the free list).
        Hashes of the request's blocks that become full (and whose tokens are known from
        `all_token_ids[:num_tokens]`) are registered, so others can hit them — even before
        the step that writes their K/V has run (that step writes K/V before attention).
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        bs = self.block_size
        rid = request.request_id
        state = self._requests.get(rid)
        num_held = len(state.blocks) if state is not None else 0
        if state is not None and not new_computed_blocks:
            # The common case, a decode token that fits the blocks already held: nothing to
            # allocate; at most a block that just became full to register (the general path
            # below does the same, step by step, at several times the cost per request).
            total_tokens = request.num_computed_tokens + num_new_tokens
            if total_tokens <= num_held * bs:
                if total_tokens > state.num_tokens:
                    state.num_tokens = total_tokens
                if self.enable_prefix_caching and \
                        len(state.hashes) < min(total_tokens, request.num_tokens) // bs:
                    self._cache_full_blocks(request, state, min(total_tokens, request.num_tokens))
                return []
        hits = [self.pool.blocks[i] for i in new_computed_blocks]
        if hits:
            if num_held or request.num_computed_tokens:
                raise ValueError(f"request {rid!r}: prefix hits are only for a request "
                                 "that holds no blocks and has computed nothing")
            # A hit block evicted since get_computed_blocks may hold other content by now.
            for block, expected in zip(hits, self._expected_hit_hashes(request, len(hits))):
                if block.block_hash != expected:
                    raise ValueError(f"request {rid!r}: block {block.block_id} does not hold "
                                     "its prefix (evicted since get_computed_blocks?)")

        total_tokens = request.num_computed_tokens + len(hits) * bs + num_new_tokens
        num_new_blocks = max(-(-total_tokens // bs) - num_held - len(hits), 0)
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_new_blocks + num_free_hits > self.pool.num_free_blocks:
            return None

        if state is None:
            state = self._requests[rid] = _RequestBlocks()
        # Touch before allocating: otherwise get_new_blocks could evict a free hit block.
        self.pool.touch(hits)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        state.blocks.extend(hits)
        state.hashes.extend(b.block_hash for b in hits)
        state.blocks.extend(new_blocks)
        state.num_tokens = max(state.num_tokens, total_tokens)
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, state, min(total_tokens, request.num_tokens))
            if num_held == 0 and request.num_computed_tokens == 0:  # an admission
                self._stats.queries += 1
                self._stats.hits += bool(hits)
                self._stats.query_tokens += request.num_tokens
                self._stats.hit_tokens += len(hits) * bs
        return [b.block_id for b in new_blocks]

    def _expected_hit_hashes(self, request, num_hits: int) -> list[BlockHash]:
        if self._last_hits is not None and self._last_hits[0] == request.request_id \
                and len(self._last_hits[1]) == num_hits:
            return self._last_hits[1]
        # Hits not from the last query: hash them again.
        return prefix_block_hashes(request.all_token_ids, self.block_size, request.cache_salt, num_hits)

    def _cache_full_blocks(self, request, state: _RequestBlocks, num_known_tokens: int) -> None:
        bs = self.block_size
        num_full = min(num_known_tokens // bs, len(state.blocks))
        tokens = request.all_token_ids
        for i in range(len(state.hashes), num_full):
            parent = state.hashes[-1] if i else None
            h = hash_block_tokens(parent, _block_tokens(tokens, i, bs), request.cache_salt)
            state.hashes.append(h)
            self.pool.cache_full_block(state.blocks[i], h)

    def free(self, request: Union[str, object]) -> None:
        """Release a request's blocks (a request object or its id), tail first so the tail is
        evicted first. Freeing an unknown request is a no-op."""
        rid = request if isinstance(request, str) else request.request_id
        state = self._requests.pop(rid, None)
        if state is not None:
            self.pool.free_blocks(reversed(state.blocks))

    def fork(self, parent_request_id: str, child_request_id: str) -> int:
        """Let the child share the parent's FULL blocks (ref counts +1), e.g. for n > 1
        completions of one prompt. Returns the number of tokens the shared blocks cover; the
        caller sets the child's num_computed_tokens to it and allocates the rest (the
        parent's partially filled last block is not shared: two children would write it).

        "Full" means all block_size slots were allocated for computed-or-scheduled tokens.
        """
        if parent_request_id not in self._requests:
            raise KeyError(f"unknown parent request {parent_request_id!r}")
        if child_request_id in self._requests:
            raise ValueError(f"child request {child_request_id!r} already holds blocks")
        parent = self._requests[parent_request_id]
        num_full = min(parent.num_tokens // self.block_size, len(parent.blocks))
        shared = parent.blocks[:num_full]
        self.pool.touch(shared)
        self._requests[child_request_id] = _RequestBlocks(
            blocks=list(shared), hashes=parent.hashes[:num_full],
            num_tokens=num_full * self.block_size)
        return num_full * self.block_size

    # -- queries --------------------------------------------------------------------------
    def get_block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """The request's block ids from its `start`-th block on (all of them by default)."""
        state = self._requests.get(request_id)
        return [b.block_id for b in state.blocks[start:]] if state is not None else []

    def num_request_blocks(self, request_id: str) -> int:
        state = self._requests.get(request_id)
        return len(state.blocks) if state is not None else 0

    @property
    def num_blocks(self) -> int:
        """All blocks, the null block included."""
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached_blocks

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks (null block excluded) held by some request."""
        return self.pool.num_used_blocks / self.pool.total

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        s = self._stats
        return PrefixCacheStats(s.queries, s.hits, s.query_tokens, s.hit_tokens)

    def reset_prefix_cache(self) -> None:
        """Forget all block hashes (nothing is hit afterwards) and zero the stats. Blocks
        already full in running requests are not re-registered; later ones are."""
        self.pool.reset_prefix_cache()
        self._stats = PrefixCacheStats()
        self._last_hits = None


def _block_tokens(tokens, i: int, bs: int) -> tuple:
    # int(): numpy ints pickle differently from Python ints and would change the hash.
    return tuple(int(t) for t in tokens[i * bs:(i + 1) * bs])
