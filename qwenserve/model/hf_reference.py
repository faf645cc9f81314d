"""Qwen-1 checkpoints as Hugging Face `Qwen2ForCausalLM`: the independent implementation that
tests compare logits against and that benchmarks use as the transformers baseline.

The mapping is exact: c_attn -> q/k/v (with bias), w2 -> gate_proj, w1 -> up_proj,
c_proj -> down_proj, MLP width intermediate_size // 2. Dynamic NTK and logn have no Qwen2
equivalent, so the comparison holds for prompts within `seq_length`.
"""
from __future__ import annotations

import os

import torch
from safetensors import safe_open

from qwenserve.model.config import QwenConfig
from qwenserve.model.loader import checkpoint_files


def qwen2_state_dict(tensors: dict[str, torch.Tensor], config: QwenConfig) -> dict[str, torch.Tensor]:
    h = config.hidden_size
    out = {"model.embed_tokens.weight": tensors["transformer.wte.weight"],
           "model.norm.weight": tensors["transformer.ln_f.weight"],
           "lm_head.weight": tensors["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        w, b = tensors[src + "attn.c_attn.weight"], tensors[src + "attn.c_attn.bias"]
        for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = w[k * h:(k + 1) * h]
            out[dst + f"self_attn.{name}.bias"] = b[k * h:(k + 1) * h]
        out[dst + "self_attn.o_proj.weight"] = tensors[src + "attn.c_proj.weight"]
        out[dst + "mlp.gate_proj.weight"] = tensors[src + "mlp.w2.weight"]
        out[dst + "mlp.up_proj.weight"] = tensors[src + "mlp.w1.weight"]
        out[dst + "mlp.down_proj.weight"] = tensors[src + "mlp.c_proj.weight"]
        out[dst + "input_layernorm.weight"] = tensors[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = tensors[src + "ln_2.weight"]
    return out


def load_qwen2_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A transformers `Qwen2ForCausalLM` holding the weights of the Qwen-1 checkpoint at `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = QwenConfig.from_dir(path)
    hf_config = Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.mlp_width, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.layer_norm_epsilon,
        rope_theta=float(config.rotary_emb_base), tie_word_embeddings=False, use_sliding_window=False,
        attention_dropout=0.0, torch_dtype=dtype)
    hf_config._attn_implementation = "eager" if device == "cpu" else "sdpa"
    tensors = {}
    for file, names in checkpoint_files(path).items():
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for name in names:
                tensors[name] = f.get_tensor(name).to(dtype)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(hf_config)
    model.load_state_dict(qwen2_state_dict(tensors, config), assign=True, strict=True)
    # Buffers made on the meta device (rotary inv_freq, kept in float32) are rebuilt for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config)
    return model.to(device=device).eval()
