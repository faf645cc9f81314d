"""`PrefixIndex`: the prompt blocks one engine-core replica served recently, as the front end
remembers them, bounded.

Owns one replica's set of block hashes (the KV cache's own chained hashes, NTK alpha included:
`qwenserve.kvcache.prefix_block_hashes`), in least-recently-used order, at most `capacity`
of them, and the longest-prefix match of a new prompt's hashes against it. It is a guess at
what that replica's prefix cache holds, never a view of it: the cache may have evicted a block
the index still lists, or kept one the index dropped.

A prompt's blocks go in last block first, so its first block is the most recent and the
least-recently-used end loses a prompt's tail before its head (the KV cache frees a request's
blocks tail first for the same reason); so what remains of a prompt is always a prefix of it,
and a match walks from the first block until the first miss.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class PrefixIndex:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity: must be at least 1 block, got {capacity}")
        self.capacity = capacity
        self._hashes: OrderedDict[bytes, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._hashes

    def match(self, block_hashes: Sequence[bytes]) -> int:
        """How many of the leading `block_hashes` the index holds (stops at the first miss)."""
        held = self._hashes
        for matched, block_hash in enumerate(block_hashes):
            if block_hash not in held:
                return matched
        return len(block_hashes)

    def insert(self, block_hashes: Sequence[bytes]) -> None:
        """Marks a prompt's blocks as just served; evicts the least recently used beyond capacity."""
        held = self._hashes
        for block_hash in reversed(block_hashes[:self.capacity]):
            if block_hash in held:
                held.move_to_end(block_hash)
            else:
                held[block_hash] = None
        while len(held) > self.capacity:
            held.popitem(last=False)

    def clear(self) -> None:
        self._hashes.clear()
