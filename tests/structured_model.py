"""A random-weight test model that prefers closing quotes and brackets, for structured output.

A random model's unconstrained output is noise and, under a grammar that allows free text
(a JSON string, extra properties, whitespace), it rarely chooses to close anything, so it
runs to max_tokens. This model's LM head gives a fixed bonus to the tokens made only of
`"`, `]` and `}`: QUOTE_BONUS to those with a quote (inside a string, `}}}` is just more
text; `"` or `"}` closes it), BRACKET_BONUS to the others, and a smaller one to the end
tokens (END_BONUS); tokens made only of whitespace get WHITESPACE_PENALTY, or where a
grammar allows free whitespace (disable_any_whitespace=False) there are thousands of them
against a handful of useful tokens, and a random model never gets past them. So:

- unmasked, it emits closers and end tokens (`"]}"` ... : never valid JSON);
- masked, every free choice is closed at the first step the grammar allows it, so the
  output is short, and valid only because the mask made it so.

How the bonus gets into the logits without an LM-head bias (Qwen has none): hidden dimension
0 is made constant. Every token's embedding gets CONSTANT_DIM_VALUE there and the rows of the
branch projections that write dimension 0 are zeroed, so the residual stream's dimension 0 is
exactly that constant at every position; after the final RMSNorm it is close to a constant
(it varies with the other dimensions' norm, a few percent), and LM-head column 0 carries the
bonus divided by it for the favoured rows (0 for the rest).
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file

from qwenserve.model.checkpoint import save_sharded
from qwenserve.model.tokenizer import NUM_RANKS, QwenTokenizer
from qwenserve.structured_output.vocabulary import END_TOKEN_IDS

QUOTE_BONUS = 30.0
BRACKET_BONUS = 20.0
END_BONUS = 16.0
WHITESPACE_PENALTY = -20.0
CONSTANT_DIM_VALUE = 4.0
_CLOSER_CHARS = frozenset(b'"]}')
_WHITESPACE_CHARS = frozenset(b" \t\n\r")


def closer_token_ids(tokenizer: QwenTokenizer | None = None) -> list[int]:
    """Ordinary tokens whose bytes are only `"`, `]` and `}` (e.g. `"`, `"}`, `]}`, `}}}`)."""
    tokenizer = tokenizer or QwenTokenizer()
    return [t for t in range(NUM_RANKS)
            if set(tokenizer.id_to_bytes(t)) <= _CLOSER_CHARS]


def whitespace_token_ids(tokenizer: QwenTokenizer | None = None) -> list[int]:
    """Ordinary tokens whose bytes are all JSON whitespace (space, tab, newline, return)."""
    tokenizer = tokenizer or QwenTokenizer()
    return [t for t in range(NUM_RANKS)
            if set(tokenizer.id_to_bytes(t)) <= _WHITESPACE_CHARS]


def write_closer_model(src_dir: str, out_dir: str) -> str:
    """Copy of the checkpoint at `src_dir` (e.g. the built-in tiny model) whose output favours
    closers and end tokens as the module docstring says; returns `out_dir`."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(glob.glob(os.path.join(src_dir, "model-*.safetensors"))):
        tensors.update(load_file(shard))
    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    hidden_rms = 1.0  # the embedding's std: random_tensors draws it from N(0, 1)
    hidden = config["hidden_size"]
    # RMSNorm output at dimension 0, with the other dimensions at their typical size.
    normed = CONSTANT_DIM_VALUE / ((CONSTANT_DIM_VALUE ** 2 + (hidden - 1) * hidden_rms ** 2) / hidden) ** 0.5

    wte = tensors["transformer.wte.weight"].float()
    wte[:, 0] = CONSTANT_DIM_VALUE
    tensors["transformer.wte.weight"] = wte.to(torch.bfloat16)
    for name in list(tensors):
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            proj = tensors[name].clone()
            proj[0, :] = 0  # no branch writes dimension 0
            tensors[name] = proj
    ln_f = tensors["transformer.ln_f.weight"].clone()
    ln_f[0] = 1.0
    tensors["transformer.ln_f.weight"] = ln_f
    head = tensors["lm_head.weight"].float()
    head[:, 0] = 0.0
    tokenizer = QwenTokenizer()
    for t in closer_token_ids(tokenizer):
        bonus = QUOTE_BONUS if b'"' in tokenizer.id_to_bytes(t) else BRACKET_BONUS
        head[t, 0] = bonus / normed
    head[whitespace_token_ids(tokenizer), 0] = WHITESPACE_PENALTY / normed
    head[sorted(END_TOKEN_IDS), 0] = END_BONUS / normed
    tensors["lm_head.weight"] = head.to(torch.bfloat16)

    os.makedirs(out_dir, exist_ok=True)
    for name in ("config.json", "generation_config.json", "qwen.tiktoken"):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    save_sharded(tensors, out_dir, max_shard_bytes=32 * 1024 ** 2)
    return out_dir
