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
from typing import Optional

import torch
import torch.distributed as dist

from qwenserve.model.config import QwenConfig
from qwenserve.model.parallel import TensorParallelGroup, set_tp_group

# Seconds a collective may wait for its peers before failing (gloo and NCCL both honour it).
DEFAULT_TIMEOUT_S = float(os.environ.get("QWENSERVE_DIST_TIMEOUT_S", "60"))


def _tp_constraints(model_config: QwenConfig) -> list[tuple[str, int, int]]:
    """(what, size, multiple): tp must divide `size` and leave a multiple of `multiple` per rank."""
    dims = [("attention heads", model_config.num_attention_heads, 1),
            ("MLP width (intermediate_size // 2)", model_config.mlp_width, 1),
            ("vocabulary rows", model_config.vocab_size, 1)]
    quant = model_config.quantization
    if quant is not None:
        group = quant.group_size
        h, width = model_config.hidden_size, model_config.mlp_width
        # Row-parallel GPTQ layers split their inputs in whole quantization groups; column-parallel
        # ones keep whole qzeros words (8 output columns) on each rank. The group split implies the
        # word split when the group size is a multiple of 8 (c_proj's inputs are as wide as
        # c_attn's thirds and w1/w2); the word split is checked anyway, for odd group sizes.
        dims += [(f"quantization groups of attn.c_proj (hidden {h} / group {group})",
                  h // group if group > 0 else 1, 1),
                 (f"quantization groups of mlp.c_proj (MLP width {width} / group {group})",
                  width // group if group > 0 else 1, 1),
                 ("c_attn output columns per third (hidden size)", h, 8),
                 ("w1/w2 output columns (MLP width)", width, 8)]
    return dims


def _tp_fits(model_config: QwenConfig, tp: int) -> Optional[str]:
    """None if `tp` fits, else what it breaks."""
    for what, size, multiple in _tp_constraints(model_config):
        if size % tp:
            return f"does not divide the {size} {what}"
        if (size // tp) % multiple:
            return (f"leaves {size // tp} of the {size} {what} per rank, not a multiple of "
                    f"{multiple} (GPTQ packs {multiple} columns of qzeros per int32 word)")
    return None


def valid_tp_sizes(model_config: QwenConfig) -> list[int]:
    """The tensor-parallel sizes that divide the heads, the MLP width and the vocabulary (and,
    for GPTQ Int4, the quantization groups of the row-parallel layers)."""
    return [n for n in range(1, model_config.num_attention_heads + 1) if _tp_fits(model_config, n) is None]


def check_tp_size(model_config: QwenConfig, tp: int) -> None:
    """Raises ValueError naming the first dimension `tp` does not fit and the valid values."""
    failure = _tp_fits(model_config, tp)
    if failure is not None:
        valid = ", ".join(map(str, valid_tp_sizes(model_config)))
        raise ValueError(f"tensor_parallel_size {tp} {failure}; valid values: {valid}")


def free_port(host: str = "") -> int:
    """A TCP port that is free on this node right now (the rendezvous binds it moments later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
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
        # The layers' all_reduce is captured in the decode CUDA graphs (worker/cuda_graphs.py):
        # without recordStream calls ProcessGroupNCCL's collectives are graph-capturable.
        os.environ.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=rendezvous_store(rank, world_size, master_addr, master_port, timeout),
                            rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    # One rank per process: the tensor-parallel group is the whole world.
    group = TensorParallelGroup(rank=rank, size=world_size, group=dist.group.WORLD)
    set_tp_group(group)
    return group


def rendezvous_store(rank: int, world_size: int, master_addr: str, master_port: int,
                     timeout: timedelta) -> dist.TCPStore:
    """The process group's TCPStore at master_addr:master_port, served by rank 0 on that address
    alone: torch's own server (init_method="tcp://...") listens on every interface, which a
    loopback-only deployment must not."""
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, world_size, False, timeout)
    family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
    listener = socket.create_server((master_addr, master_port), family=family)
    # detach(): the store owns the descriptor from here on (and closes it).
    return dist.TCPStore(master_addr, master_port, world_size, True, timeout, multi_tenant=True,
                         master_listen_fd=listener.detach())


def destroy_distributed() -> None:
    """Leaves the process group and puts back the single-rank group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    set_tp_group(TensorParallelGroup())
