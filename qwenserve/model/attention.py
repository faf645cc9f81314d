"""The attention interface between the model and the KV cache.

`AttentionMetadata` describes one step's flat batch (built by the worker's model runner);
`Attention` stores the new K/V into the paged cache and attends through the block tables.
With no cache bound (`k_cache is None`) it attends densely over the step's own tokens: that
is the no-cache reference path, where every request's whole sequence is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] int32: request b's tokens are [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # [B] int32: tokens with K/V after this step
    max_query_len: int
    max_seq_len: int
    rope_theta: torch.Tensor  # [T] float32: RoPE base per token (dynamic NTK: per request)
    logn_scale: Optional[torch.Tensor] = None  # [T] float32, None when logn is off
    block_tables: Optional[torch.Tensor] = None  # [B, M] int32
    slot_mapping: Optional[torch.Tensor] = None  # [T] int64, -1 = do not store
    # The first num_decodes requests have one query token each (the runner orders them first):
    # the Triton path sends them to the split-KV decode kernel, the rest to the prefill kernel.
    num_decodes: int = 0
    # Host copies for the torch paths, which loop over requests.
    query_start_loc_list: Optional[list[int]] = None
    seq_lens_list: Optional[list[int]] = None

    @property
    def num_requests(self) -> int:
        return self.seq_lens.shape[0]


def logn_scales(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Qwen's logn factor per query: log(i)/log(seq_length) at 1-based position i > seq_length."""
    one_based = positions.to(torch.float64) + 1
    scale = torch.log(one_based) / torch.log(torch.tensor(float(seq_length), dtype=torch.float64))
    return torch.where(one_based > seq_length, scale, torch.ones_like(scale)).to(torch.float32)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                           scale: float) -> torch.Tensor:
    """Attention over the step's own tokens only (each request's whole sequence is present)."""
    out = torch.empty_like(q)
    starts = meta.query_start_loc_list or meta.query_start_loc.tolist()
    for b in range(len(starts) - 1):
        lo, hi = starts[b], starts[b + 1]
        qb = q[lo:hi].float().transpose(0, 1)  # [H, L, D]
        if meta.logn_scale is not None:
            qb = qb * meta.logn_scale[lo:hi].view(1, -1, 1)
        kb = k[lo:hi].float().transpose(0, 1)
        vb = v[lo:hi].float().transpose(0, 1)
        scores = (qb @ kb.transpose(1, 2)) * scale
        n = hi - lo
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores.masked_fill_(~mask, float("-inf"))
        out[lo:hi] = (scores.softmax(-1) @ vb).transpose(0, 1).to(q.dtype)
    return out


class Attention(nn.Module):
    """Store K/V by `slot_mapping`, then paged attention; dense when no cache is bound."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, ops):
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.ops = num_heads, head_dim, scale, ops
        self.k_cache: Optional[torch.Tensor] = None  # [N, block_size, H, D], bound by the worker
        self.v_cache: Optional[torch.Tensor] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.k_cache is None:
            return dense_causal_attention(q, k, v, meta, self.scale)
        self.ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.ops.paged_attention(q, self.k_cache, self.v_cache, meta.query_start_loc, meta.seq_lens,
                                        meta.block_tables, self.scale, meta.logn_scale,
                                        meta.max_query_len, meta.max_seq_len, meta.num_decodes)
