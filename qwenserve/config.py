"""`EngineConfig`: every knob of the engine, the same names as the CLI flags and `LLM` keywords."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "bfloat16", "float16", "float32")


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
    use_triton: Optional[bool] = None  # None: Triton kernels on CUDA, torch reference elsewhere
    use_cuda_graphs: bool = True
    max_waiting_requests: int = 4096

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ValueError(f"{field} {message}, got {getattr(self, field)!r}")

        check(self.device in _DEVICES, "device", f"must be one of {', '.join(_DEVICES)}")
        check(self.dtype in _DTYPES, "dtype", f"must be one of {', '.join(_DTYPES)}")
        for name in ("tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens",
                     "block_size", "max_waiting_requests"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  name, "must be a positive integer")
        check(self.block_size & (self.block_size - 1) == 0, "block_size", "must be a power of two")
        check(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 1),
              "max_model_len", "must be a positive integer")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        check(isinstance(self.kv_cache_memory, int) and self.kv_cache_memory > 0,
              "kv_cache_memory", "must be a positive number of bytes")
        check(self.num_kv_blocks is None or self.num_kv_blocks >= 2, "num_kv_blocks", "must be >= 2")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Builds a config from keywords, naming any keyword that is not a field."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)
