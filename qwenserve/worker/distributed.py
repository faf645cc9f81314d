"""torch.distributed for one tensor-parallel rank: process-group init and teardown, the
`TensorParallelGroup` the model layers use, and the tp-size check.

The driver picks a TCP rendezvous address (rank 0's node, a free port there); every rank calls
`init_distributed` with it at the same time. gloo on the CPU, NCCL on CUDA. The collective
timeout is short on purpose: when a peer dies, a surviving rank's all_reduce must give up
instead of blocking its actor forever (the executor detects the death separately, via Ray).

Nothing here imports Ray, so the tp check runs before any Ray session starts.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from qwenserve.model.config import QwenConfig
from qwenserve.model.parallel import TensorParallelGroup, set_tp_group

# Seconds a collective may wait for its peers before failing (gloo and NCCL both honour it).
DEFAULT_TIMEOUT_S = float(os.environ.get("QWENSERVE_DIST_TIMEOUT_S", "60"))


def valid_tp_sizes(model_config: QwenConfig) -> list[int]:
    """The tensor-parallel sizes that divide the heads, the MLP width and the vocabulary."""
    dims = (model_config.num_attention_heads, model_config.mlp_width, model_config.vocab_size)
    return [n for n in range(1, model_config.num_attention_heads + 1) if all(d % n == 0 for d in dims)]


def check_tp_size(model_config: QwenConfig, tp: int) -> None:
    """Raises ValueError naming the first dimension `tp` does not divide and the valid values."""
    dims = (("attention heads", model_config.num_attention_heads),
            ("MLP width (intermediate_size // 2)", model_config.mlp_width),
            ("vocabulary rows", model_config.vocab_size))
    for what, size in dims:
        if size % tp:
            valid = ", ".join(map(str, valid_tp_sizes(model_config)))
            raise ValueError(f"tensor_parallel_size {tp} does not divide the {size} {what}; "
                             f"valid values: {valid}")


def free_port(host: str = "") -> int:
    """A TCP port that is free on this node right now (the rendezvous binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                     device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> TensorParallelGroup:
    """Joins the process group and installs this rank's `TensorParallelGroup` for the model."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds the NCCL communicator eagerly to this device
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s), **kwargs)
    # One rank per process: the tensor-parallel group is the whole world.
    group = TensorParallelGroup(rank=rank, size=world_size, group=dist.group.WORLD)
    set_tp_group(group)
    return group


def destroy_distributed() -> None:
    """Leaves the process group and puts back the single-rank group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    set_tp_group(TensorParallelGroup())
