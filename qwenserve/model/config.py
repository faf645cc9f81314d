"""`QwenConfig`: a Qwen (v1) checkpoint's config.json, read under either of its two namings."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

SUPPORTED_ARCHITECTURES = ("QWenLMHeadModel",)

# Each canonical field, then the older names it was stored under.
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
    "seq_length": ("seq_length", "n_positions"),
    "vocab_size": ("padded_vocab_size", "vocab_size"),
}
_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


@dataclass
class QuantConfig:
    """GPTQ settings of an Int4 checkpoint."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True


@dataclass
class QwenConfig:
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int  # Qwen-1 stores twice the MLP width here
    vocab_size: int  # rows of the embedding and LM head (padded)
    seq_length: int = 2048  # training length: the pivot of dynamic NTK and logn
    max_position_embeddings: int = 8192
    kv_channels: Optional[int] = None
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"  # what the checkpoint was saved in
    quantization: Optional[QuantConfig] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) x kv_channels "
                f"({self.kv_channels}) != hidden_size ({self.hidden_size})")
        if self.intermediate_size % 2:
            raise ValueError(f"config: intermediate_size must be even, got {self.intermediate_size}")
        if self.rotary_pct != 1.0:
            raise ValueError(f"config: rotary_pct {self.rotary_pct} is not supported (only 1.0)")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def mlp_width(self) -> int:
        """Width of w1/w2 outputs: Qwen-1 halves intermediate_size."""
        return self.intermediate_size // 2

    def ntk_alpha(self, prompt_len: int) -> float:
        """Dynamic-NTK alpha for a request, fixed by its prompt length (1.0 when disabled)."""
        if not self.use_dynamic_ntk or prompt_len <= 0:
            return 1.0
        context_value = math.log2(prompt_len / self.seq_length) + 1
        return float(max(2 ** math.ceil(context_value) - 1, 1))

    def rope_theta(self, ntk_alpha: float) -> float:
        """RoPE base after NTK scaling: base * alpha^(d/(d-2))."""
        d = self.head_dim
        return self.rotary_emb_base * ntk_alpha ** (d / (d - 2))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "QwenConfig":
        archs = raw.get("architectures") or []
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(f"{source}: unsupported architecture {archs}; qwenserve serves "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)} (Qwen v1) checkpoints")
        model_type = raw.get("model_type")
        if model_type not in (None, "qwen"):
            raise ValueError(f"{source}: unsupported model_type {model_type!r}; expected 'qwen'")

        values: dict[str, Any] = {}
        for name, aliases in _ALIASES.items():
            for alias in aliases:
                if raw.get(alias) is not None:
                    values[name] = raw[alias]
                    break
        missing = [f"{n} (or {'/'.join(a for a in _ALIASES[n] if a != n)})" for n in _REQUIRED
                   if n not in values]
        if missing:
            raise ValueError(f"{source}: missing field(s): {', '.join(missing)}")

        plain = ("max_position_embeddings", "kv_channels", "layer_norm_epsilon", "rotary_emb_base",
                 "rotary_pct", "use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings")
        for name in plain:
            if raw.get(name) is not None:
                values[name] = raw[name]
        if raw.get("bf16"):
            values["torch_dtype"] = "bfloat16"
        elif raw.get("fp16"):
            values["torch_dtype"] = "float16"
        elif raw.get("fp32"):
            values["torch_dtype"] = "float32"
        elif isinstance(raw.get("torch_dtype"), str):
            values["torch_dtype"] = raw["torch_dtype"]
        quant = raw.get("quantization_config")
        if quant:
            if quant.get("quant_method", "gptq") != "gptq" or quant.get("bits", 4) != 4:
                raise ValueError(f"{source}: unsupported quantization {quant.get('quant_method')} "
                                 f"{quant.get('bits')}-bit; only GPTQ 4-bit is supported")
            values["quantization"] = QuantConfig(
                bits=4, group_size=int(quant.get("group_size", 128)),
                desc_act=bool(quant.get("desc_act", False)), sym=bool(quant.get("sym", True)))
        for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                     "vocab_size", "seq_length"):
            if name in values and (not isinstance(values[name], int) or values[name] <= 0):
                raise ValueError(f"{source}: {name} must be a positive integer, got {values[name]!r}")
        values["extra"] = {k: v for k, v in raw.items() if k not in values}
        return cls(**values)

    @classmethod
    def from_dir(cls, path: str) -> "QwenConfig":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {path!r}")
        with open(file) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON: {e}") from None
        return cls.from_dict(raw, source=file)


def load_generation_config(path: Optional[str]) -> dict:
    """The checkpoint's generation_config.json, or {} when it has none."""
    if path is None:
        return {}
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)
