"""`Worker`: one rank's device, weight shard, KV-cache tensors and model runner.

The same class serves in-process (tp = 1) and inside a Ray actor (tp > 1); it knows its rank
through the tensor-parallel group the caller set up before `load_model`.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from qwenserve.config import EngineConfig
from qwenserve.kernels import get_ops
from qwenserve.model.config import QwenConfig
from qwenserve.model.loader import load_weights
from qwenserve.model.parallel import get_tp_group
from qwenserve.model.qwen import QWenLMHeadModel
from qwenserve.scheduler.output import SchedulerOutput
from qwenserve.worker.cuda_graphs import capture_decode_graphs
from qwenserve.worker.memory_profile import profile_kv_budget
from qwenserve.worker.model_runner import ModelRunner, ModelRunnerOutput

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
logger = logging.getLogger(__name__)


def resolve_device(config: EngineConfig, local_rank: int = 0) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, model_config: QwenConfig, device: torch.device) -> torch.dtype:
    """The compute dtype. On CUDA, bfloat16 needs compute capability 8.0 (Ampere) or newer:
    asked for explicitly on an older GPU it is an error; chosen by dtype="auto" (the checkpoint's
    dtype) it becomes float16, with a warning."""
    if config.dtype != "auto":
        dtype = _DTYPES[config.dtype]
    elif device.type == "cpu":
        return torch.float32  # bf16 matmuls are slow on most CPUs
    else:
        dtype = _DTYPES.get(model_config.torch_dtype, torch.bfloat16)
    if device.type == "cuda" and dtype == torch.bfloat16:
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < (8, 0):
            gpu = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
            if config.dtype != "auto":
                raise ValueError(f"dtype: bfloat16 needs a GPU of compute capability 8.0 or newer (Ampere); "
                                 f"{gpu} has none. Use dtype='float16', or dtype='auto', which picks "
                                 f"float16 on this GPU")
            logger.warning("dtype auto: the checkpoint is bfloat16, which %s does not support; "
                           "running in float16", gpu)
            return torch.float16
    return dtype


def kv_bytes_per_block(model_config: QwenConfig, block_size: int, dtype: torch.dtype, tp_size: int) -> int:
    heads = model_config.num_attention_heads // tp_size
    per_layer = 2 * block_size * heads * model_config.head_dim * torch.finfo(dtype).bits // 8
    return per_layer * model_config.num_hidden_layers


class Worker:
    def __init__(self, config: EngineConfig, model_dir: str, local_rank: int = 0):
        self.config, self.model_dir = config, model_dir
        self.model_config = QwenConfig.from_dir(model_dir)
        self.device = resolve_device(config, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config, self.model_config, self.device)
        self.tp = get_tp_group()
        self.use_triton = config.use_triton if config.use_triton is not None else self.device.type == "cuda"
        self.ops = get_ops(self.use_triton)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.model: Optional[QWenLMHeadModel] = None
        self.runner: Optional[ModelRunner] = None
        self.num_blocks = 0

    def load_model(self, progress: Optional[Callable[[int, int], None]] = None) -> None:
        with torch.device(self.device):
            self.model = QWenLMHeadModel(self.model_config, self.ops, self.dtype, self.tp)
        load_weights(self.model, self.model_dir, progress)
        self.model.eval()

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit the memory budget on this rank."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = kv_bytes_per_block(self.model_config, self.config.block_size, self.dtype, self.tp.size)
        if self.device.type == "cuda":  # measured: a profiled step (worker/memory_profile.py)
            budget = profile_kv_budget(self.model, self.config, self.device, self.dtype, self.max_model_len,
                                       is_driver=self.tp.rank == 0, per_block=per_block,
                                       rank=self.tp.rank).bytes
        else:
            budget = self.config.kv_cache_memory
        num_blocks = int(budget // per_block)
        if num_blocks < 2:
            raise ValueError(f"the KV cache budget ({int(budget)} bytes) holds fewer than 2 blocks of "
                             f"{per_block} bytes; raise gpu_memory_utilization or kv_cache_memory")
        return num_blocks

    def init_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        heads = self.model_config.num_attention_heads // self.tp.size
        shape = (num_blocks, self.config.block_size, heads, self.model_config.head_dim)
        for layer in self.model.attention_layers():
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.runner = ModelRunner(self.model, self.config.block_size, self.device, seed=self.config.seed,
                                  is_driver=self.tp.rank == 0, async_scheduling=self.config.async_scheduling)
        if self.device.type == "cuda" and self.config.use_cuda_graphs and self.use_triton:
            # The torch reference kernels sync with the host, so only the Triton path is captured.
            # Every rank captures or none does (decided together; see cuda_graphs.py).
            self.runner.decode_graphs = capture_decode_graphs(
                self.model, min(self.config.max_num_seqs, 256), self.max_model_len,
                self.config.block_size, self.device, self.tp)

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        return self.runner.execute(scheduler_output)
