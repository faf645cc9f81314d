"""The Qwen model against independent implementations: transformers' Qwen2 for the core math,
and a plain-torch forward written from the formulas for dynamic NTK and logn attention."""
import math

import pytest
import torch

from qwenserve.kernels import get_ops
from qwenserve.model.config import QwenConfig
from qwenserve.model.qwen import QWenLMHeadModel
from qwenserve.model.reference import reference_logits

# float32 on the CPU: the two implementations differ only in summation order.
MAX_REL_ERR = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_match_transformers_qwen2(tiny_checkpoint, tiny_model):
    pytest.importorskip("transformers")
    from qwenserve.model.hf_reference import load_qwen2_model

    hf = load_qwen2_model(tiny_checkpoint, torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [[9707, 11, 1879, 0], [151644, 872, 198, 108386, 151645],
               torch.randint(0, 151851, (300,), generator=g).tolist(), [42]]
    ours = reference_logits(tiny_model, prompts)  # all four in one flat batch
    for prompt, logits in zip(prompts, ours):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0].float()
        assert logits.shape == expected.shape
        assert rel_err(logits, expected) < MAX_REL_ERR, len(prompt)


def _formula_forward(tensors: dict, cfg: QwenConfig, ids: list[int]) -> torch.Tensor:
    """Qwen-1 forward for one sequence straight from the formulas, with NTK and logn."""
    L, H, D = len(ids), cfg.num_attention_heads, cfg.head_dim
    ctx = math.log2(L / cfg.seq_length) + 1
    alpha = max(2 ** math.ceil(ctx) - 1, 1) if cfg.use_dynamic_ntk else 1
    base = cfg.rotary_emb_base * alpha ** (D / (D - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(L).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(t):  # [L, H, D]
        half = torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1)
        return t * cos[:, None] + half * sin[:, None]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon) * w

    logn = torch.tensor([math.log(i, cfg.seq_length) if i > cfg.seq_length else 1.0
                         for i in range(1, L + 1)])
    x = tensors["transformer.wte.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        h = norm(x, tensors[p + "ln_1.weight"])
        qkv = h @ tensors[p + "attn.c_attn.weight"].T + tensors[p + "attn.c_attn.bias"]
        q, k, v = (t.view(L, H, D) for t in qkv.chunk(3, -1))
        q, k = rope(q), rope(k)
        if cfg.use_logn_attn:
            q = q * logn[:, None, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(L, H * D)
        x = x + attn @ tensors[p + "attn.c_proj.weight"].T
        h = norm(x, tensors[p + "ln_2.weight"])
        a1, a2 = h @ tensors[p + "mlp.w1.weight"].T, h @ tensors[p + "mlp.w2.weight"].T
        x = x + (a1 * torch.nn.functional.silu(a2)) @ tensors[p + "mlp.c_proj.weight"].T
    return norm(x, tensors["transformer.ln_f.weight"]) @ tensors["lm_head.weight"].T


@pytest.mark.parametrize("use_ntk,use_logn", [(True, True), (True, False), (False, True)])
def test_dynamic_ntk_and_logn_match_formulas(tiny_model, use_ntk, use_logn):
    cfg_dict = dict(tiny_model.config.to_dict(), seq_length=32, use_dynamic_ntk=use_ntk,
                    use_logn_attn=use_logn)
    cfg_dict.pop("extra")
    cfg = QwenConfig(**cfg_dict)
    model = QWenLMHeadModel(cfg, get_ops(False), torch.float32)
    model.load_state_dict(tiny_model.state_dict())
    tensors = {}
    for name, param, kwargs in tiny_model.checkpoint_targets():
        if kwargs.get("shard") == "w1":
            param = param[:cfg.mlp_width]
        elif kwargs.get("shard") == "w2":
            param = param[cfg.mlp_width:]
        tensors[name] = param.detach()
    g = torch.Generator().manual_seed(1)
    # Within seq_length, past 1x (alpha 3), past 2x (alpha 7), past 4x (alpha 15), batched together.
    prompts = [torch.randint(0, 151851, (n,), generator=g).tolist() for n in (20, 40, 70, 140)]
    assert [cfg.ntk_alpha(len(p)) for p in prompts] == ([1, 3, 7, 15] if use_ntk else [1, 1, 1, 1])
    ours = reference_logits(model, prompts)
    for prompt, logits in zip(prompts, ours):
        expected = _formula_forward(tensors, cfg, prompt)
        assert rel_err(logits, expected) < MAX_REL_ERR, len(prompt)
    if use_ntk:  # the alphas matter: a wrong base changes the logits
        wrong = reference_logits(model, prompts[1:2], ntk_alphas=[1.0])[0]
        assert rel_err(wrong, _formula_forward(tensors, cfg, prompts[1])) > 1e-3


def test_ntk_alpha_formula():
    cfg = QwenConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                     vocab_size=8, seq_length=100)
    assert [cfg.ntk_alpha(n) for n in (1, 100, 101, 200, 201, 400, 401)] == [1, 1, 3, 3, 7, 7, 15]
    assert cfg.rope_theta(3.0) == pytest.approx(10000 * 3.0 ** (32 / 30))


def test_bfloat16_on_cpu_close_to_float32(tiny_checkpoint, tiny_model):
    from qwenserve.model.loader import load_weights

    model = QWenLMHeadModel(tiny_model.config, get_ops(False), torch.bfloat16)
    load_weights(model, tiny_checkpoint)
    prompt = list(range(1000, 1040))
    low = reference_logits(model, [prompt])[0]
    high = reference_logits(tiny_model, [prompt])[0]
    assert low.dtype == torch.float32  # logits are returned in float32 whatever the model dtype
    # bf16 keeps ~3 significant digits; through 2 layers and a 151936-row head, 5% of the range.
    assert rel_err(low, high) < 0.05
    assert (low.argmax(-1) == high.argmax(-1)).float().mean() > 0.8


def test_random_weights_do_not_collapse_greedy_decoding(tiny_model):
    from qwenserve.model.reference import reference_greedy

    tokens = reference_greedy(tiny_model, [9707, 11, 1879, 0], 24)
    assert len(set(tokens)) >= 12, tokens


def test_make_checkpoint_cli_layout(tmp_path):
    import json

    from safetensors import safe_open

    from qwenserve.cli import main

    out = tmp_path / "ckpt"
    assert main(["make-checkpoint", "--preset", "tiny", "--layers", "3", "--seed", "7",
                 "--shard-size-mb", "16", str(out)]) == 0
    cfg = QwenConfig.from_dir(str(out))
    assert cfg.num_hidden_layers == 3
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    model = QWenLMHeadModel(cfg, get_ops(False), torch.float32)
    expected = {name for name, _, _ in model.checkpoint_targets()}
    assert set(index) == expected
    h, w = cfg.hidden_size, cfg.mlp_width
    shapes = {"transformer.h.2.attn.c_attn.weight": [3 * h, h], "transformer.h.2.attn.c_attn.bias": [3 * h],
              "transformer.h.2.mlp.w1.weight": [w, h], "transformer.h.2.mlp.c_proj.weight": [h, w],
              "lm_head.weight": [151936, h], "transformer.wte.weight": [151936, h]}
    for name, shape in shapes.items():
        with safe_open(str(out / index[name]), framework="pt") as f:
            assert list(f.get_slice(name).get_shape()) == shape, name
    assert (out / "qwen.tiktoken").is_file() and (out / "generation_config.json").is_file()


def test_make_checkpoint_rejects_bad_preset():
    from qwenserve.model.checkpoint import preset_config

    with pytest.raises(ValueError, match="preset must be one of"):
        preset_config("huge")
    with pytest.raises(ValueError, match="layers must be an integer >= 1"):
        preset_config("7b", layers=0)
