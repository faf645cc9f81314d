"""Checkpoint loading: sharded and single-file layouts, and the errors for broken checkpoints."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenserve.kernels import get_ops
from qwenserve.model.config import QwenConfig
from qwenserve.model.loader import load_weights
from qwenserve.model.qwen import QWenLMHeadModel


def _model(path, dtype=torch.float32):
    return QWenLMHeadModel(QwenConfig.from_dir(path), get_ops(False), dtype)


def _single_file_copy(src, dst) -> dict:
    """Copies a sharded checkpoint into one model.safetensors; returns its tensors."""
    os.makedirs(dst)
    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, f)))
        elif f.endswith(".json") and "index" not in f:
            shutil.copy(os.path.join(src, f), dst)
    return tensors


def test_sharded_checkpoint_layout(tiny_checkpoint):
    index = json.load(open(os.path.join(tiny_checkpoint, "model.safetensors.index.json")))
    files = set(index["weight_map"].values())
    assert len(files) >= 2, "the tiny model is sharded so the index path is exercised"
    assert index["weight_map"]["transformer.h.0.attn.c_attn.weight"] in files
    assert os.path.isfile(os.path.join(tiny_checkpoint, "qwen.tiktoken"))
    cfg = QwenConfig.from_dir(tiny_checkpoint)
    assert cfg.vocab_size == 151936 and cfg.mlp_width == 256


def test_single_file_loads_same_weights(tiny_checkpoint, tiny_model, tmp_path):
    dst = tmp_path / "single"
    save_file(_single_file_copy(tiny_checkpoint, dst), str(dst / "model.safetensors"))
    model = _model(str(dst), torch.bfloat16)  # cast on load: checkpoint is bf16, both exact
    load_weights(model, str(dst))
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_model.state_dict().items()):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a.float(), b), name


def _broken(tiny_checkpoint, tmp_path, edit):
    dst = tmp_path / "broken"
    tensors = _single_file_copy(tiny_checkpoint, dst)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return str(dst)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    path = _broken(tiny_checkpoint, tmp_path, lambda t: t.pop("transformer.h.1.mlp.w2.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): transformer\.h\.1\.mlp\.w2\.weight"):
        load_weights(_model(path), path)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    path = _broken(tiny_checkpoint, tmp_path,
                   lambda t: t.__setitem__("transformer.h.9.attn.c_attn.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor transformer\.h\.9\.attn\.c_attn\.weight"):
        load_weights(_model(path), path)


def test_wrong_shape_names_tensor_and_shapes(tiny_checkpoint, tmp_path):
    path = _broken(tiny_checkpoint, tmp_path,
                   lambda t: t.__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(384, 64)))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight: checkpoint shape "
                                         r"\[384, 64\] does not match the model's expected shape \[384, 128\]"):
        load_weights(_model(path), path)


@pytest.mark.parametrize("index_text,message", [
    ("{not json", "bad index"),
    ('{"metadata": {}}', "bad index"),
    ('{"weight_map": {"lm_head.weight": "model-00009-of-00009.safetensors"}}', "does not exist"),
])
def test_bad_index(tiny_checkpoint, tmp_path, index_text, message):
    dst = tmp_path / "badindex"
    shutil.copytree(tiny_checkpoint, dst)
    (dst / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(ValueError, match=message):
        load_weights(_model(str(dst)), str(dst))


def test_index_naming_tensor_absent_from_shard(tiny_checkpoint, tmp_path):
    dst = tmp_path / "lying"
    shutil.copytree(tiny_checkpoint, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    name = "transformer.h.0.ln_1.weight"
    index["weight_map"][name] = next(f for f in set(index["weight_map"].values())
                                     if f != index["weight_map"][name])
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.ln_1\.weight is listed in the index but not in the file"):
        load_weights(_model(str(dst)), str(dst))


def test_no_weights_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from qwenserve.model.loader import checkpoint_files
        checkpoint_files(str(tmp_path))


def test_rewriting_a_checkpoint_directory_leaves_no_stale_shards(tmp_path):
    from qwenserve.model.checkpoint import make_checkpoint

    out = str(tmp_path / "ckpt")
    make_checkpoint(out, "tiny", layers=1, max_shard_bytes=16 * 1024 ** 2)  # several shards
    many = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(many) >= 3
    make_checkpoint(out, "tiny", layers=1, seed=1, max_shard_bytes=2 * 1024 ** 3)  # one shard
    left = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert left == sorted(set(index["weight_map"].values())) == ["model-00001-of-00001.safetensors"]
    load_weights(_model(out), out)
