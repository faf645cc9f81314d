"""CUDA graphs for decode steps: the model forward captured once per padded batch size.

A decode step of a 7B model launches hundreds of small kernels; replaying a captured graph
removes the per-launch CPU cost that otherwise leaves the GPU idle at small batches. Every
input lives in a static buffer sized for the largest captured batch; a step copies its
tensors in, pads the rest (slot -1: nothing stored; seq_len 0: nothing read), and replays
the graph of the smallest captured size that fits. Attention grids are sized from fixed
upper bounds (`max_seq_len` = max_model_len) so replays stay valid for any context length.

Tensor parallelism. Whether an NCCL launch is graph-captured must be the same on every rank of
the communicator, and a graph with a captured collective must be replayed by every rank (NCCL's
CUDA-graph rules): if one rank replayed a graph while another ran eagerly, their collectives would
no longer pair and the step would hang until the process group's timeout. So the ranks decide
together (`capture_decode_graphs`): after each capture step every rank reports success in one small
all-reduce, and either all keep their graphs or all decode eagerly, with the failing ranks named
in the log of every rank. Eager warm-up forwards (before each capture) run their collectives on
every rank alike; a failure there is a real error and fails the start-up; captures themselves
communicate nothing, so a capture failing on one rank leaves the collectives in step.

The TP all-reduce inside a captured forward is torch.distributed's NCCL all_reduce (the layers'
`TensorParallelGroup.all_reduce`), captured as is: NCCL >= 2.9.6 supports capture; each rank
drives one GPU from one thread, as NCCL requires for capture; the communicator is created eagerly
(`init_distributed` passes device_id) and used by the warm-up before any capture; and
TORCH_NCCL_AVOID_RECORD_STREAMS=1 (set in `init_distributed`) keeps ProcessGroupNCCL from
recording the allocator streams that broke capture in older torch (vLLM's fix, before pynccl).
`TensorParallelGroup.graph_capture_safe` checks what can be checked (NCCL backend, NCCL version);
where it fails, no rank captures. A custom all-reduce or a pynccl-style communicator is not used.
"""
from __future__ import annotations

import bisect
import logging
from typing import Callable, Optional, Sequence

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
        self._pool = None  # the memory pool the graphs share (the largest is captured first)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            max_query_len=1, max_seq_len=self.max_model_len, rope_theta=self.rope_theta[:size],
            logn_scale=None if self.logn_scale is None else self.logn_scale[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size])

    def warm_up(self, size: int) -> None:
        """An eager forward at `size`: compiles the Triton kernels outside the capture and runs
        the step's collectives on every rank alike."""
        with torch.inference_mode():
            self.model(self.input_ids[:size], self.positions[:size], self._meta(size))
        torch.cuda.synchronize(self.device)

    def capture_size(self, size: int) -> None:
        """Captures the forward at `size` (call largest first: smaller graphs reuse its pool)."""
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            self.outputs[size] = self.model(self.input_ids[:size], self.positions[:size], self._meta(size))
        self._pool = graph.pool()
        self.replays[size] = graph.replay

    def capture(self) -> None:
        """Every size on this rank alone (tp = 1)."""
        for size in reversed(self.sizes):
            self.warm_up(size)
            self.capture_size(size)
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


def failed_ranks(ok: bool, tp, device: torch.device) -> list[int]:
    """The ranks that report not `ok`, the same list on every rank (one all-reduce of a flag per
    rank; nothing at tp = 1)."""
    if tp.size == 1:
        return [] if ok else [0]
    flags = torch.zeros(tp.size, dtype=torch.int32, device=device)
    flags[tp.rank] = 0 if ok else 1
    tp.all_reduce(flags)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def capture_collectively(steps: Sequence[tuple[str, Callable[[], None], Callable[[], None]]], tp,
                         device: torch.device) -> tuple[list[int], str]:
    """Runs (name, collective, capture) steps on every rank: `collective` (communicates; an
    exception propagates: it is a real failure), then `capture` (communicates nothing; an
    exception is caught), then agrees with the other ranks; stops at the first step that failed on
    any rank. Returns (the ranks that failed, this rank's error or "")."""
    for name, collective, capture in steps:
        collective()
        error = ""
        try:
            capture()
        except Exception as e:  # a capture failure costs speed, never correctness
            error = f"{name}: {type(e).__name__}: {e}"
        failed = failed_ranks(not error, tp, device)
        if failed:
            return failed, error
    return [], ""


def capture_decode_graphs(model, max_batch: int, max_model_len: int, block_size: int,
                          device: torch.device, tp) -> Optional[DecodeGraphs]:
    """Decode graphs captured on every rank, or None on every rank (eager decoding), decided
    together (see the module docstring); a failure is logged on every rank with the ranks named."""
    safe, why = tp.graph_capture_safe()
    unsafe = failed_ranks(safe, tp, device)
    if unsafe:
        logger.warning("decode CUDA graphs off on every rank: rank(s) %s cannot capture the "
                       "tensor-parallel all-reduce%s", unsafe, f" ({why})" if why else "")
        return None
    graphs: list[DecodeGraphs] = []

    def build():
        graphs.append(DecodeGraphs(model, max_batch, max_model_len, block_size, device))

    def steps():
        yield "allocating the graph buffers", lambda: None, build
        for size in capture_sizes(max_batch)[::-1]:  # largest first: smaller graphs reuse its pool
            yield (f"batch size {size}", lambda size=size: graphs[0].warm_up(size),
                   lambda size=size: graphs[0].capture_size(size))

    failed, error = capture_collectively(steps(), tp, device)
    if error:
        logger.warning("rank %d: CUDA graph capture failed at %s", tp.rank, error)
    if failed:
        logger.warning("decode CUDA graphs off on every rank (tensor-parallel ranks must all replay "
                       "or all run eagerly): rank(s) %s failed to capture; decoding eagerly", failed)
        graphs.clear()
        torch.cuda.empty_cache()
        return None
    torch.cuda.synchronize(device)
    logger.info("captured decode CUDA graphs for batch sizes %s%s", graphs[0].sizes,
                f" on all {tp.size} ranks" if tp.size > 1 else "")
    return graphs[0]
