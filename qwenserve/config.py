"""`EngineConfig`: every knob of the engine, the same names as the CLI flags and `LLM` keywords."""
from __future__ import annotations

import dataclasses
import importlib
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Optional

_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "bfloat16", "float16", "float32")
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes a uint64


@dataclass
class EngineConfig:
    model: Optional[str] = None  # checkpoint directory; None: the built-in tiny model
    tensor_parallel_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: Optional[int] = None  # None: the model's seq_length/max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int = 512 * 1024 * 1024  # bytes of KV cache on the CPU
    num_kv_blocks: Optional[int] = None  # overrides the memory budget (tests, benchmarks)
    enable_prefix_caching: bool = True
    seed: int = 0
    ray_address: Optional[str] = None
    # A local Ray cluster (no ray_address) and the ranks' sockets listen on the loopback address
    # only; `qwenserve launch` sets it when --host is a loopback address.
    ray_loopback_only: bool = False
    use_triton: Optional[bool] = None  # None: Triton kernels on CUDA, torch reference elsewhere
    use_cuda_graphs: bool = True
    max_waiting_requests: int = 4096
    # Schedule step k+1 while the device runs step k (samples come back one step later).
    async_scheduling: bool = True
    # Offline `LLM`/`LLMEngine`: run the engine core in a process of its own (servers always do).
    engine_core_process: bool = False
    # "module:callable" that builds the executor instead of the built-in ones (benchmarks'
    # simulated device); a string, so the config can cross into another process.
    executor_plugin: Optional[str] = None

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ValueError(f"{field} {message}, got {getattr(self, field)!r}")

        def is_int(value) -> bool:  # True is not a count
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def is_real(value) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        check(self.model is None or isinstance(self.model, str), "model", "must be a checkpoint directory or None")
        check(isinstance(self.device, str) and self.device in _DEVICES, "device",
              f"must be one of {', '.join(_DEVICES)}")
        check(isinstance(self.dtype, str) and self.dtype in _DTYPES, "dtype", f"must be one of {', '.join(_DTYPES)}")
        for name in ("tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens",
                     "block_size", "max_waiting_requests"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, name, "must be a positive integer")
        check(self.block_size & (self.block_size - 1) == 0, "block_size", "must be a power of two")
        check(self.max_model_len is None or (is_int(self.max_model_len) and self.max_model_len >= 1),
              "max_model_len", "must be a positive integer or None")
        check(is_real(self.gpu_memory_utilization) and 0.0 < self.gpu_memory_utilization <= 1.0,
              "gpu_memory_utilization", "must be a number in (0, 1]")
        check(is_int(self.kv_cache_memory) and self.kv_cache_memory > 0,
              "kv_cache_memory", "must be a positive integer number of bytes")
        check(self.num_kv_blocks is None or (is_int(self.num_kv_blocks) and self.num_kv_blocks >= 2),
              "num_kv_blocks", "must be an integer >= 2 or None")
        check(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", "must be a bool")
        # Anything outside SEED_LIMIT (SamplingParams.seed's range too) would only fail at
        # the first sampled token, killing the engine.
        check(is_int(self.seed) and 0 <= self.seed < SEED_LIMIT, "seed", "must be an integer in [0, 2**64)")
        check(self.ray_address is None or isinstance(self.ray_address, str), "ray_address", "must be a string or None")
        check(isinstance(self.ray_loopback_only, bool), "ray_loopback_only", "must be a bool")
        check(self.use_triton is None or isinstance(self.use_triton, bool), "use_triton", "must be a bool or None")
        check(isinstance(self.use_cuda_graphs, bool), "use_cuda_graphs", "must be a bool")
        check(isinstance(self.async_scheduling, bool), "async_scheduling", "must be a bool")
        check(isinstance(self.engine_core_process, bool), "engine_core_process", "must be a bool")
        check(self.executor_plugin is None or isinstance(self.executor_plugin, str), "executor_plugin",
              "must be a 'module:callable' string or None")
        if self.executor_plugin is not None:
            resolve_executor_plugin(self.executor_plugin)  # a bad path fails here, not at engine start
        for name in ("tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "max_waiting_requests", "max_model_len", "kv_cache_memory", "num_kv_blocks", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, int(value))  # numpy integers -> int
        self.gpu_memory_utilization = float(self.gpu_memory_utilization)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Builds a config from keywords, naming any keyword that is not a field."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)


def resolve_executor_plugin(spec: str) -> Callable:
    """The callable named by `EngineConfig.executor_plugin` ("module:callable"); ValueError
    naming executor_plugin when it cannot be imported or is not callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"executor_plugin must look like 'module:callable', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raised while importing
        raise ValueError(f"executor_plugin {spec!r}: cannot import {module_name!r} "
                         f"({type(e).__name__}: {e})") from None
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"executor_plugin {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(target):
        raise ValueError(f"executor_plugin {spec!r}: {attr!r} is not callable")
    return target
