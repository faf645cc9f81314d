"""GPTQ Int4 checkpoints end to end on the CPU: the random Int4 checkpoint's layout, the Int4
model against the fp model built from the same dequantized weights (logits and greedy
generation), tp = 2 shards of every GPTQ layer, the tp check, the CLI, and load errors.

The oracle is an ordinary fp checkpoint holding the dequantized weights, loaded by the
existing dense path: both models then compute the same function, so in float32 they may
differ only by the order of the matmul's additions.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwenserve import LLM, SamplingParams
from qwenserve.kernels import get_ops
from qwenserve.kernels.gptq_matmul import dequantize_gptq
from qwenserve.model.checkpoint import make_checkpoint
from qwenserve.model.config import QwenConfig
from qwenserve.model.layers import InMemorySource
from qwenserve.model.loader import checkpoint_files, load_weights
from qwenserve.model.parallel import TensorParallelGroup
from qwenserve.model.qwen import QWenLMHeadModel
from qwenserve.model.quant import GPTQRowParallelLinear
from qwenserve.model.reference import reference_logits
from qwenserve.worker.distributed import check_tp_size, valid_tp_sizes

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
SEQUENCES = [[9707, 11, 847, 829, 374], [104520, 60687, 95695, 68793, 141034, 99921, 14789, 2, 3]]
# Both sides float32 on the CPU: the same products summed in another order.
LOGIT_TOL = dict(rtol=1e-4, atol=1e-4)
ENGINE_KWARGS = dict(device="cpu", dtype="float32", kv_cache_memory=16 * 1024 ** 2, seed=0)


def read_all(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in checkpoint_files(path):
        with safe_open(os.path.join(path, file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def write_checkpoint(src: str, dst: str, tensors: dict[str, torch.Tensor], config_edit=None) -> str:
    """A copy of checkpoint `src` (config, tokenizer) holding `tensors` in one safetensors file."""
    os.makedirs(dst)
    for name in ("qwen.tiktoken", "generation_config.json"):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    if config_edit:
        config_edit(raw)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f)
    save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(dst, "model.safetensors"))
    return dst


def dequantized(tensors: dict[str, torch.Tensor], group_size: int = 128) -> dict[str, torch.Tensor]:
    """The fp checkpoint of the same model: each GPTQ linear as a float32 [out, in] weight."""
    out = {n: t.float() for n, t in tensors.items() if not n.endswith(tuple(f".{p}" for p in PARTS))}
    for name in tensors:
        if name.endswith(".qweight"):
            prefix = name[:-len(".qweight")]
            w = dequantize_gptq(tensors[name], tensors[prefix + ".qzeros"], tensors[prefix + ".scales"],
                                group_size)
            out[prefix + ".weight"] = w.t().contiguous()
            if prefix.endswith("c_attn"):
                out[prefix + ".bias"] = tensors[prefix + ".bias"].float()
    return out


class UnreducedGroup(TensorParallelGroup):
    """Rank `rank` of a tp group with no process behind it: each all-reduce is counted and its
    input returned unreduced, so a test sums the ranks' partial outputs itself."""

    def __init__(self, rank: int, size: int):
        super().__init__(rank=rank, size=size, group=None)
        self.all_reduces = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.all_reduces += 1
        return x


def load(path: str, tp: TensorParallelGroup = None, ops=None) -> QWenLMHeadModel:
    model = QWenLMHeadModel(QwenConfig.from_dir(path), ops or get_ops(False), torch.float32, tp)
    load_weights(model, path)
    return model.eval()


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("int4") / "ckpt"), "tiny", seed=3, int4=True)


@pytest.fixture(scope="module")
def fp_dir(int4_dir, tmp_path_factory):
    def drop_quantization(raw):
        raw.pop("quantization_config")
        raw.update(fp16=False, fp32=True)

    return write_checkpoint(int4_dir, str(tmp_path_factory.mktemp("deq") / "ckpt"),
                            dequantized(read_all(int4_dir)), drop_quantization)


def test_int4_checkpoint_has_the_real_layout(int4_dir):
    raw = json.load(open(os.path.join(int4_dir, "config.json")))
    real = json.load(open(os.path.join(os.path.dirname(__file__), "data", "configs", "qwen-72b-chat-int4.json")))
    assert raw["quantization_config"] == real["quantization_config"]
    assert raw["fp16"] is True and raw["bf16"] is False
    cfg = QwenConfig.from_dir(int4_dir)
    assert cfg.quantization.group_size == 128 and cfg.torch_dtype == "float16"
    tensors = read_all(int4_dir)
    h, w = cfg.hidden_size, cfg.mlp_width
    shapes = {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.w1": (h, w), "mlp.w2": (h, w),
              "mlp.c_proj": (w, h)}
    for linear, (k, n) in shapes.items():
        p = f"transformer.h.1.{linear}."
        assert p + "weight" not in tensors
        expected = {"qweight": ((k // 8, n), torch.int32), "qzeros": ((k // 128, n // 8), torch.int32),
                    "scales": ((k // 128, n), torch.float16), "g_idx": ((k,), torch.int32),
                    "bias": ((n,), torch.float16)}
        for part, (shape, dtype) in expected.items():
            t = tensors[p + part]
            assert (tuple(t.shape), t.dtype) == (shape, dtype), p + part
        assert (tensors[p + "qzeros"] == 0x77777777).all()  # symmetric zero 8, stored as 7
        assert torch.equal(tensors[p + "g_idx"], torch.arange(k, dtype=torch.int32) // 128)
        assert (tensors[p + "bias"] != 0).any() == (linear == "attn.c_attn")
    for name in ("transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"):
        assert tensors[name].dtype == torch.float16


def test_int4_logits_equal_the_dequantized_fp_model(int4_dir, fp_dir):
    int4, fp = load(int4_dir), load(fp_dir)
    assert int4.h[0].mlp.gate_up.qweight.dtype == torch.int32
    for got, want in zip(reference_logits(int4, SEQUENCES), reference_logits(fp, SEQUENCES)):
        torch.testing.assert_close(got, want, **LOGIT_TOL)
    # The same through the Triton GPTQ kernel (interpreted here), everything else reference.
    ops = get_ops(False)
    mixed = type(ops)(**{**vars(ops), "gptq_matmul": get_ops(True).gptq_matmul})
    for got, want in zip(reference_logits(load(int4_dir, ops=mixed), SEQUENCES[:1]),
                         reference_logits(fp, SEQUENCES[:1])):
        torch.testing.assert_close(got, want, **LOGIT_TOL)


@pytest.mark.parametrize("core_process", [False, True], ids=["in_process", "core_process"])
def test_int4_greedy_generation_equals_the_dequantized_fp_model(int4_dir, fp_dir, core_process):
    prompts = ["Hello, my name is", "蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是", "a"]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = []
    for path in (int4_dir, fp_dir):
        llm = LLM(model=path, engine_core_process=core_process, **ENGINE_KWARGS)
        try:
            outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert outputs[0] == outputs[1]
    assert len(set(outputs[0][0])) > 3  # a real continuation, not one token repeated


# ---------------------------------------------------------------------- tensor parallel
@pytest.fixture(scope="module")
def wide_int4_dir(tmp_path_factory):
    # hidden 256 and MLP width 512 hold 2 and 4 groups of 128: row-parallel layers split at tp = 2.
    return make_checkpoint(str(tmp_path_factory.mktemp("wide") / "ckpt"), "tiny", layers=1, seed=5,
                           int4=True, hidden_size=256, kv_channels=64, intermediate_size=1024)


def test_tp2_shards_of_every_gptq_layer(wide_int4_dir, largest_reads):
    full = read_all(wide_int4_dir)
    cfg = QwenConfig.from_dir(wide_int4_dir)
    h, w = cfg.hidden_size, cfg.mlp_width
    whole = load(wide_int4_dir).h[0]
    x_h, x_w = torch.randn(3, h), torch.randn(3, w)

    largest_reads.clear()  # from here on only the ranks' own loads count
    column_parts, row_parts = [], []
    for rank in range(2):
        tp = UnreducedGroup(rank, 2)
        block = load(wide_int4_dir, tp).h[0]
        p = "transformer.h.0."

        def cols(name, width, pack=1, start=0):
            t = full[p + name]
            per = width // 2
            s = slice((start + rank * per) // pack, (start + (rank + 1) * per) // pack)
            return t[..., s]

        qkv = block.attn.c_attn
        for part, pack in (("qweight", 1), ("qzeros", 8), ("scales", 1), ("bias", 1)):
            expected = torch.cat([cols(f"attn.c_attn.{part}", h, pack, third * h) for third in range(3)], -1)
            got = getattr(qkv, part)
            assert got.shape == expected.shape, part
            torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=0)
        assert torch.equal(qkv.g_idx, full[p + "attn.c_attn.g_idx"])
        gate_up = block.mlp.gate_up
        for part, pack in (("qweight", 1), ("qzeros", 8), ("scales", 1)):
            expected = torch.cat([cols(f"mlp.w1.{part}", w, pack), cols(f"mlp.w2.{part}", w, pack)], -1)
            assert torch.equal(getattr(gate_up, part), expected), part
        for layer, name, k in ((block.attn.c_proj, "attn.c_proj", h), (block.mlp.c_proj, "mlp.c_proj", w)):
            for part, rows in (("qweight", k // 8), ("qzeros", k // 128), ("scales", k // 128), ("g_idx", k)):
                per = rows // 2
                expected = full[f"{p}{name}.{part}"][rank * per:(rank + 1) * per]
                assert torch.equal(getattr(layer, part), expected), (name, part)
            assert layer.bias is None
        # The shards compute the whole layer: column outputs concatenate, row outputs sum.
        # The layers' own forwards: each row-parallel rank takes its slice of the input and
        # hands its partial output to the all-reduce once (UnreducedGroup leaves the sum to us).
        column_parts.append((qkv(x_h), gate_up(x_h)))
        assert tp.all_reduces == 0
        half_h = slice(rank * h // 2, (rank + 1) * h // 2)
        half_w = slice(rank * w // 2, (rank + 1) * w // 2)
        row_parts.append((block.attn.c_proj(x_h[:, half_h]), block.mlp.c_proj(x_w[:, half_w])))
        assert tp.all_reduces == 2

    q0, q1 = (c[0].split(h // 2, -1) for c in column_parts)
    torch.testing.assert_close(torch.cat([q0[0], q1[0], q0[1], q1[1], q0[2], q1[2]], -1), whole.attn.c_attn(x_h))
    g0, g1 = (c[1].split(w // 2, -1) for c in column_parts)
    torch.testing.assert_close(torch.cat([g0[0], g1[0], g0[1], g1[1]], -1), whole.mlp.gate_up(x_h))
    # Row outputs: the same float32 products as the whole layer's, summed in two halves.
    for i, (layer, x) in enumerate(((whole.attn.c_proj, x_h), (whole.mlp.c_proj, x_w))):
        torch.testing.assert_close(row_parts[0][i] + row_parts[1][i], layer(x), rtol=1e-5, atol=1e-5)
    # Sliced reads: no rank read a whole packed tensor of a sharded layer.
    assert largest_reads, "the loads went through SafetensorsSource.read"
    for name, numel in largest_reads.items():
        if name.endswith((".qweight", ".qzeros", ".scales")):
            assert numel <= full[name].numel() // 2, name


def test_tp_check_counts_quantization_groups(int4_dir, wide_int4_dir):
    assert valid_tp_sizes(QwenConfig.from_dir(int4_dir)) == [1]
    assert valid_tp_sizes(QwenConfig.from_dir(wide_int4_dir)) == [1, 2]
    with pytest.raises(ValueError, match=r"tensor_parallel_size 4 does not divide the 2 quantization groups "
                                         r"of attn.c_proj \(hidden 256 / group 128\); valid values: 1, 2$"):
        check_tp_size(QwenConfig.from_dir(wide_int4_dir), 4)
    # Qwen-72B-Chat-Int4: 64 heads, 64 and 192 groups, 8192 / 64 = 128 columns per rank.
    qwen_72b_int4 = QwenConfig.from_dict({
        "hidden_size": 8192, "num_attention_heads": 64, "num_hidden_layers": 80, "intermediate_size": 49152,
        "vocab_size": 152064, "quantization_config": {"bits": 4, "group_size": 128, "desc_act": False}})
    assert valid_tp_sizes(qwen_72b_int4) == [1, 2, 4, 8, 16, 32, 64]
    # An odd group size of 4 splits into groups finer than a qzeros word of 8 columns.
    odd = QwenConfig.from_dict({
        "hidden_size": 256, "num_attention_heads": 64, "num_hidden_layers": 1, "intermediate_size": 1024,
        "vocab_size": 1024, "quantization_config": {"bits": 4, "group_size": 4}})
    with pytest.raises(ValueError, match=r"tensor_parallel_size 64 leaves 4 of the 256 c_attn output columns "
                                         r"per third \(hidden size\) per rank, not a multiple of 8"):
        check_tp_size(odd, 64)


# ---------------------------------------------------------------------- CLI and errors
def test_make_checkpoint_cli_int4(tmp_path):
    from qwenserve.cli import main

    out = tmp_path / "int4"
    assert main(["make-checkpoint", "--preset", "tiny", "--int4", "--layers", "1", str(out)]) == 0
    cfg = QwenConfig.from_dir(str(out))
    assert cfg.quantization is not None and cfg.num_hidden_layers == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    model = QWenLMHeadModel(cfg, get_ops(False), torch.float32)
    assert set(index) == {name for name, _, _ in model.checkpoint_targets()}
    assert {f"transformer.h.0.{linear}.{part}" for linear in LINEARS for part in PARTS} <= set(index)
    load_weights(model, str(out))


def test_non_zero_bias_of_a_bias_less_layer_is_an_error(int4_dir, tmp_path):
    tensors = read_all(int4_dir)
    tensors["transformer.h.1.mlp.w2.bias"][5] = 0.5
    bad = write_checkpoint(int4_dir, str(tmp_path / "bad"), tensors)
    with pytest.raises(ValueError, match=r"tensor transformer\.h\.1\.mlp\.w2\.bias: non-zero bias for a "
                                         r"layer without bias"):
        load(bad)


def test_wrong_qweight_shape_is_an_error_naming_the_tensor(int4_dir, tmp_path):
    tensors = read_all(int4_dir)
    name = "transformer.h.0.attn.c_proj.qweight"
    tensors[name] = tensors[name][:, :64]
    bad = write_checkpoint(int4_dir, str(tmp_path / "bad"), tensors)
    with pytest.raises(ValueError, match=rf"tensor {name}: checkpoint shape \[16, 64\] does not match the "
                                         r"model's expected shape \[16, 128\]"):
        load(bad)


def test_act_order_g_idx_and_float_qweight_are_errors():
    layer = GPTQRowParallelLinear(256, 64, False, 128, TensorParallelGroup(), get_ops(False), torch.float32)
    shuffled = (torch.arange(256, dtype=torch.int32) // 128).flip(0)
    with pytest.raises(ValueError, match=r"tensor x\.g_idx: g_idx is not arange.*desc_act"):
        layer.g_idx.weight_loader(layer.g_idx, InMemorySource("x.g_idx", shuffled))
    with pytest.raises(ValueError, match=r"tensor x\.qweight: dtype torch.float16 where GPTQ stores int32"):
        layer.qweight.weight_loader(layer.qweight, InMemorySource("x.qweight", torch.zeros(32, 64).half()))


def test_export_without_zero_biases_loads_the_same(int4_dir, tmp_path):
    """Some GPTQ exports omit the all-zero biases of the bias-less linears: they are optional."""
    tensors = read_all(int4_dir)
    dropped = [n for n in tensors if n.endswith(".bias") and ".c_attn." not in n]
    assert dropped
    for name in dropped:
        del tensors[name]
    slim = load(write_checkpoint(int4_dir, str(tmp_path / "slim"), tensors))
    full = load(int4_dir)
    for (name, a), (_, b) in zip(slim.state_dict().items(), full.state_dict().items()):
        assert torch.equal(a, b), name
    tensors = read_all(int4_dir)
    del tensors["transformer.h.0.attn.c_attn.bias"]  # a real bias stays required
    with pytest.raises(ValueError, match=r"missing tensor\(s\): transformer\.h\.0\.attn\.c_attn\.bias"):
        load(write_checkpoint(int4_dir, str(tmp_path / "bad"), tensors))
