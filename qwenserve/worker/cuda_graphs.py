"""CUDA graphs for decode steps: the model forward captured once per padded batch size.

A decode step of a 7B model launches hundreds of small kernels; replaying a captured graph
removes the per-launch CPU cost that otherwise leaves the GPU idle at small batches. Every
input lives in a static buffer sized for the largest captured batch; a step copies its
tensors in, pads the rest (slot -1: nothing stored; seq_len 0: nothing read), and replays
the graph of the smallest captured size that fits. Attention grids are sized from fixed
upper bounds (`max_seq_len` = max_model_len) so replays stay valid for any context length.
"""
from __future__ import annotations

import bisect
import logging
from typing import Callable, Optional

import torch

from qwenserve.model.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 16))
    return sizes if sizes[-1] == max_batch else sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_model_len: int, block_size: int, device: torch.device):
        self.model, self.device = model, device
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_batch)
        n, width = self.sizes[-1], -(-max_model_len // block_size)
        kw = dict(device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, **kw)
        self.positions = torch.zeros(n, dtype=torch.long, **kw)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, **kw)
        self.rope_theta = torch.ones(n, dtype=torch.float32, **kw)
        self.logn_scale = torch.ones(n, dtype=torch.float32, **kw) if model.config.use_logn_attn else None
        self.seq_lens = torch.zeros(n, dtype=torch.int32, **kw)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, **kw)  # one token per request
        self.block_tables = torch.zeros((n, width), dtype=torch.int32, **kw)
        self.replays: dict[int, Callable[[], None]] = {}  # size -> replay of its captured graph
        self.outputs: dict[int, torch.Tensor] = {}  # size -> the graph's output buffer

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            max_query_len=1, max_seq_len=self.max_model_len, rope_theta=self.rope_theta[:size],
            logn_scale=None if self.logn_scale is None else self.logn_scale[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size])

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            args = (self.input_ids[:size], self.positions[:size], self._meta(size))
            self.model(*args)  # compiles the Triton kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args)
            pool = graph.pool()
            self.replays[size] = graph.replay
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, num_requests: int, meta: AttentionMetadata) -> bool:
        return meta.max_query_len == 1 and num_requests <= self.sizes[-1] and bool(self.replays)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.rope_theta[:n].copy_(meta.rope_theta)
        if self.logn_scale is not None:
            self.logn_scale[:n].copy_(meta.logn_scale)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:size].fill_(0)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.replays[size]()
        return self.outputs[size][:n]


def try_capture(model, max_batch: int, max_model_len: int, block_size: int,
                device: torch.device) -> Optional[DecodeGraphs]:
    """Captured decode graphs, or None (eager decode) when capture fails."""
    try:
        graphs = DecodeGraphs(model, max_batch, max_model_len, block_size, device)
        graphs.capture()
        return graphs
    except Exception as e:  # a capture failure costs speed, never correctness
        logger.warning("CUDA graph capture failed, decoding eagerly: %s", e)
        return None
