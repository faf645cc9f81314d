"""The tensor-parallel group the model layers talk to: rank, size and its collectives.

The worker sets it up (`qwenserve.worker.distributed`); with tp = 1 every collective is the
identity, so the layers need no special case.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: Optional[object] = None  # a torch.distributed ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def broadcast_from_rank0(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrites `x` on every rank with rank 0's `x` (same shape and dtype everywhere)."""
        if self.size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return x

    def graph_capture_safe(self) -> tuple[bool, str]:
        """Whether `all_reduce` may be captured in a CUDA graph, and why not: the NCCL backend
        at version 2.9.6 or newer (worker/cuda_graphs.py says why that suffices)."""
        if self.size == 1:
            return True, ""
        backend = dist.get_backend(self.group)
        if backend != "nccl":
            return False, f"its all-reduce runs on {backend}, which CUDA graphs cannot capture"
        version = torch.cuda.nccl.version()
        if isinstance(version, int):  # older torch: 2708 for 2.7.8, 21903 for 2.19.3
            version = (version // 1000, version % 1000 // 100, version % 100) if version < 10000 else \
                (version // 10000, version % 10000 // 100, version % 100)
        if tuple(version[:3]) < (2, 9, 6):
            return False, f"NCCL {'.'.join(map(str, version[:3]))} cannot be captured (2.9.6 or newer can)"
        return True, ""

    def gather_last_dim_to_rank0(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Concatenates each rank's last-dim shard on rank 0; other ranks get None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=dist.get_global_rank(self.group, 0) if self.group else 0,
                    group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None


_TP = TensorParallelGroup()


def get_tp_group() -> TensorParallelGroup:
    return _TP


def set_tp_group(group: TensorParallelGroup) -> None:
    global _TP
    _TP = group


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"tensor parallel size {denominator} does not divide {what} ({numerator})")
    return numerator // denominator
