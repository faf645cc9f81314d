"""How the worker sizes what it keeps free of KV cache on a GPU (`activation_reserve_bytes`),
checked against lower bounds read off the forward pass of the real Qwen configs."""
import json
from pathlib import Path

import pytest
import torch

from qwenserve.model.config import QwenConfig
from qwenserve.worker.worker import activation_reserve_bytes

CONFIGS = Path(__file__).parent / "data" / "configs"
GiB = 1024 ** 3


def _config(name):
    return QwenConfig.from_dict(json.loads((CONFIGS / name).read_text()), source=name)


@pytest.mark.parametrize("name,tp", [("qwen-1_8b.json", 1), ("qwen-7b.json", 1), ("qwen-14b.json", 2),
                                     ("qwen-72b.json", 4)])
@pytest.mark.parametrize("tokens", [256, 8192, 65536])
def test_reserve_covers_the_largest_live_tensors_of_a_step(name, tp, tokens):
    cfg = _config(name)
    reserve = activation_reserve_bytes(cfg, tokens, 256, torch.bfloat16, tp)
    assert reserve >= 2 * GiB
    # Live at once in the MLP of any layer: the residual stream, the fused w1|w2 output and the
    # SwiGLU output (bf16); at the end of the step, the logits of every sampled row in fp32
    # and the sampler's copy of them.
    mlp = tokens * (cfg.hidden_size + cfg.intermediate_size // tp + cfg.intermediate_size // 2 // tp) * 2
    logits = 2 * 256 * cfg.vocab_size * 4
    assert reserve >= mlp + logits


def test_reserve_grows_with_the_token_budget_and_the_batch():
    cfg = _config("qwen-7b.json")
    small = activation_reserve_bytes(cfg, 8192, 256, torch.bfloat16, 1)
    large = activation_reserve_bytes(cfg, 65536, 256, torch.bfloat16, 1)
    # 57,344 more tokens, each with at least hidden + the fused MLP width of bf16 live.
    assert large - small >= (65536 - 8192) * (cfg.hidden_size + cfg.intermediate_size) * 2
    assert activation_reserve_bytes(cfg, 65536, 1024, torch.bfloat16, 1) > large
    assert activation_reserve_bytes(cfg, 65536, 256, torch.float32, 1) > large
    # Sharding shrinks the per-rank tensors, never below the floor.
    assert 2 * GiB <= activation_reserve_bytes(cfg, 65536, 256, torch.bfloat16, 4) < large
