"""Random-weight checkpoints in the real Qwen (v1) Hugging Face layout, and the built-in tiny model.

`make_checkpoint` writes config.json, generation_config.json, qwen.tiktoken and safetensors
shards with `model.safetensors.index.json`, with the real tensor names and shapes. Weights
are scaled so that the residual stream keeps a useful size through depth and the logits are
spread enough that greedy decoding does not collapse onto one token. `int4=True` writes the
Qwen-*-Int4 (GPTQ) layout instead: the same random weights quantized per group of 128.
"""
from __future__ import annotations

import argparse
import glob
import json
import numbers
import os
import shutil
from typing import Optional

import torch
from safetensors.torch import save_file

from qwenserve.model.config import QwenConfig
from qwenserve.model.quant import quantize_gptq
from qwenserve.model.tokenizer import QwenTokenizer

_BASE = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "attn_dropout_prob": 0.0,
    "emb_dropout_prob": 0.0, "bf16": True, "fp16": False, "fp32": False, "initializer_range": 0.02,
    "kv_channels": 128, "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "no_bias": True,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192,
    "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer", "use_cache": True,
    "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
}
PRESETS = {
    # Real vocabulary, tiny everything else: fits unit tests; heads and MLP width divide by 4.
    "tiny": dict(hidden_size=128, kv_channels=32, num_attention_heads=4, num_hidden_layers=2,
                 intermediate_size=512, seq_length=2048, max_position_embeddings=8192),
    "1.8b": dict(hidden_size=2048, num_attention_heads=16, num_hidden_layers=24, intermediate_size=11008),
    "7b": dict(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, intermediate_size=22016,
               max_position_embeddings=32768),
    "14b": dict(hidden_size=5120, num_attention_heads=40, num_hidden_layers=40, intermediate_size=27392,
                seq_length=2048, vocab_size=152064),
    "72b": dict(hidden_size=8192, num_attention_heads=64, num_hidden_layers=80, intermediate_size=49152,
                layer_norm_epsilon=1e-5, rotary_emb_base=1000000, use_dynamic_ntk=False,
                use_logn_attn=False, vocab_size=152064, padded_vocab_size=152064),
}
GENERATION_CONFIG = {
    "chat_format": "chatml", "do_sample": True, "eos_token_id": 151643, "pad_token_id": 151643,
    "max_window_size": 6144, "max_new_tokens": 512, "repetition_penalty": 1.1, "top_k": 0,
    "top_p": 0.8, "stop_words_ids": [[151645], [151644]],
}
BUILTIN_VERSION = "tiny-v1"
# The quantization block of the real Qwen-72B-Chat-Int4 config.json.
GPTQ_CONFIG = {
    "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
    "sym": True, "true_sequential": True, "model_file_base_name": "model", "quant_method": "gptq",
}
_GPTQ_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def preset_config(preset: str, layers: Optional[int] = None, **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    raw = {**_BASE, **PRESETS[preset], **overrides}  # overrides may replace preset keys
    if layers is not None:
        if not isinstance(layers, numbers.Integral) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers must be an integer >= 1, got {layers!r}")
        raw["num_hidden_layers"] = layers
    return raw


def random_tensors(config: QwenConfig, seed: int) -> dict[str, torch.Tensor]:
    """name -> bfloat16 tensor for every tensor of a real Qwen checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    h, width, layers = config.hidden_size, config.mlp_width, config.num_hidden_layers

    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def norm_weight():
        return (1.0 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16)

    # Std ~1/sqrt(fan_in) keeps each sublayer's output near unit size; the branch outputs
    # are scaled down with depth so the residual stream stays dominated by the embedding
    # plus a modest, input-dependent update.
    branch = 1.0 / (2 * layers) ** 0.5
    tensors = {"transformer.wte.weight": normal(config.vocab_size, h, std=1.0)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        tensors[p + "ln_1.weight"] = norm_weight()
        tensors[p + "attn.c_attn.weight"] = normal(3 * h, h, std=h ** -0.5)
        tensors[p + "attn.c_attn.bias"] = normal(3 * h, std=0.1)
        tensors[p + "attn.c_proj.weight"] = normal(h, h, std=branch * h ** -0.5)
        tensors[p + "ln_2.weight"] = norm_weight()
        tensors[p + "mlp.w1.weight"] = normal(width, h, std=h ** -0.5)
        tensors[p + "mlp.w2.weight"] = normal(width, h, std=h ** -0.5)
        tensors[p + "mlp.c_proj.weight"] = normal(h, width, std=branch * width ** -0.5)
    tensors["transformer.ln_f.weight"] = norm_weight()
    # Logits with a std of ~3 give a peaked but input-dependent next-token distribution.
    tensors["lm_head.weight"] = normal(config.vocab_size, h, std=3.0 * h ** -0.5)
    return tensors


def gptq_tensors(tensors: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """The Int4 checkpoint of the same model: each GPTQ linear's weight becomes qweight, qzeros,
    scales, g_idx and an fp16 bias (zeros for the bias-less ones, as AutoGPTQ exports them);
    everything else is stored in fp16, like the real Int4 checkpoints."""
    out = {}
    for name, tensor in tensors.items():
        prefix, _, kind = name.rpartition(".")
        if not prefix.endswith(_GPTQ_LINEARS):
            out[name] = tensor.to(torch.float16)
        elif kind == "weight":
            for part, value in quantize_gptq(tensor, group_size).items():
                out[f"{prefix}.{part}"] = value
            bias = tensors.get(prefix + ".bias")
            out[prefix + ".bias"] = (torch.zeros(tensor.shape[0]) if bias is None else bias).to(torch.float16)
    return out


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """Writes `model-0000k-of-0000n.safetensors` shards and the index; returns the shard names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for shard, file in zip(shards, names):
        save_file({n: t.contiguous() for n, t in shard.items()}, os.path.join(out_dir, file),
                  metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    # Shards of an earlier checkpoint written to the same directory would stay beside the new
    # ones (unused, but gigabytes at real sizes, and confusing).
    for stale in glob.glob(os.path.join(glob.escape(out_dir), "model-*-of-*.safetensors")):
        if os.path.basename(stale) not in names:
            os.remove(stale)
    return names


def make_checkpoint(out_dir: str, preset: str = "tiny", layers: Optional[int] = None, seed: int = 0,
                    max_shard_bytes: int = 2 * 1024 ** 3, int4: bool = False, **overrides) -> str:
    raw = preset_config(preset, layers, **overrides)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")  # torch.Generator's range
    if not isinstance(max_shard_bytes, numbers.Integral) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output directory {out_dir!r} exists and is not a directory")
    if int4:
        raw.update(bf16=False, fp16=True, quantization_config=dict(GPTQ_CONFIG))
    config = QwenConfig.from_dict(raw)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
    shutil.copyfile(QwenTokenizer.from_dir(None).path, os.path.join(out_dir, "qwen.tiktoken"))
    tensors = random_tensors(config, seed)
    if int4:
        tensors = gptq_tensors(tensors, config.quantization.group_size)
    save_sharded(tensors, out_dir, max_shard_bytes)
    return out_dir


def builtin_model_dir() -> str:
    """The built-in tiny model, created once under the user's cache directory."""
    cache = os.environ.get("QWENSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwenserve")
    path = os.path.join(cache, BUILTIN_VERSION)
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        staging = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        make_checkpoint(staging, "tiny", seed=0, max_shard_bytes=32 * 1024 ** 2)
        try:
            os.replace(staging, path)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return path


def add_make_checkpoint_parser(subparsers) -> None:
    from qwenserve.arg_types import int_in

    p = subparsers.add_parser("make-checkpoint", help="write a random-weight checkpoint in the Qwen layout")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layers", type=int_in(1), default=None, help="override the preset's depth")
    p.add_argument("--int4", action="store_true", help="GPTQ Int4 layout (4-bit, group size 128, like Qwen-*-Int4)")
    p.add_argument("--seed", type=int_in(0, 2 ** 64 - 1), default=0)
    p.add_argument("--shard-size-mb", type=int_in(1), default=2048, help="largest shard in MiB (default: %(default)s)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(func=_run_make_checkpoint)


def _run_make_checkpoint(args: argparse.Namespace) -> int:
    import sys

    try:
        make_checkpoint(args.out_dir, args.preset, args.layers, args.seed,
                        max_shard_bytes=args.shard_size_mb * 1024 ** 2, int4=args.int4)
    except ValueError as e:
        print(f"qwenserve make-checkpoint: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable, a file where a directory is needed, disk full, ...
        reason = e.strerror or str(e)
        where = f": {e.filename!r}" if e.filename else ""
        print(f"qwenserve make-checkpoint: error: cannot write the checkpoint to {args.out_dir!r}: "
              f"{reason}{where}", file=sys.stderr)
        return 1
    print(f"wrote {args.preset} checkpoint to {args.out_dir}")
    return 0
