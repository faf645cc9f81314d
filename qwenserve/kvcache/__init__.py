"""Paged KV-cache bookkeeping: the block pool and the per-request cache manager (no tensors)."""

from .block_pool import BlockPool, FreeBlockQueue, KVBlock, hash_block_tokens, prefix_block_hashes
from .manager import KVCacheManager, PrefixCacheStats

__all__ = ["BlockPool", "FreeBlockQueue", "KVBlock", "KVCacheManager", "PrefixCacheStats",
           "hash_block_tokens", "prefix_block_hashes"]
