"""QwenConfig: the real config.json files, the older field names, and clear errors."""
import json
import os
import pathlib

import pytest

from qwenserve.config import EngineConfig
from qwenserve.model.checkpoint import preset_config
from qwenserve.model.config import QwenConfig

REF = os.path.join(os.path.dirname(__file__), "data", "configs")


@pytest.mark.parametrize("name,hidden,heads,layers,width,vocab", [
    ("qwen-1_8b.json", 2048, 16, 24, 5504, 151936),
    ("qwen-7b.json", 4096, 32, 32, 11008, 151936),
    ("qwen-14b.json", 5120, 40, 40, 13696, 152064),
    ("qwen-72b.json", 8192, 64, 80, 24576, 152064),
    ("qwen-72b-chat-int4.json", 8192, 64, 80, 24576, 152064),
])
def test_real_configs(name, hidden, heads, layers, width, vocab):
    cfg = QwenConfig.from_dict(json.load(open(os.path.join(REF, name))))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.mlp_width,
            cfg.vocab_size, cfg.head_dim) == (hidden, heads, layers, width, vocab, 128)
    if "int4" in name:
        assert cfg.quantization.group_size == 128 and cfg.torch_dtype == "float16"


def test_old_field_names():
    raw = {"architectures": ["QWenLMHeadModel"], "n_embd": 4096, "n_head": 32, "n_layer": 32,
           "ffn_hidden_size": 22016, "n_positions": 2048, "vocab_size": 151936}
    cfg = QwenConfig.from_dict(raw)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size,
            cfg.seq_length) == (4096, 32, 32, 22016, 2048)


def test_unsupported_architecture_named():
    with pytest.raises(ValueError, match=r"unsupported architecture \['LlamaForCausalLM'\]"):
        QwenConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 8})


def test_missing_field_named():
    raw = preset_config("tiny")
    del raw["num_attention_heads"]
    with pytest.raises(ValueError, match=r"missing field\(s\): num_attention_heads \(or n_head\)"):
        QwenConfig.from_dict(raw)


def test_bad_value_named():
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive integer"):
        QwenConfig.from_dict(dict(preset_config("tiny"), num_hidden_layers=0))


# --- EngineConfig: every field checked up front, the error naming it ---------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"seed": 2 ** 64}, r"seed must be an integer in \[0, 2\*\*64\), got 18446744073709551616"),
    ({"seed": 2 ** 70}, r"seed must be an integer in \[0, 2\*\*64\)"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64\), got -1"),
    ({"seed": "abc"}, r"seed must be an integer .*got 'abc'"),
    ({"seed": True}, r"seed must be an integer"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"gpu_memory_utilization": "0.9"}, r"gpu_memory_utilization must be a number in \(0, 1\], got '0.9'"),
    ({"gpu_memory_utilization": float("nan")}, r"gpu_memory_utilization must be a number in \(0, 1\]"),
    ({"gpu_memory_utilization": True}, r"gpu_memory_utilization must be a number"),
    ({"gpu_memory_utilization": 0}, r"gpu_memory_utilization must be a number in \(0, 1\]"),
    ({"num_kv_blocks": "x"}, r"num_kv_blocks must be an integer >= 2 or None, got 'x'"),
    ({"num_kv_blocks": 1}, r"num_kv_blocks must be an integer >= 2"),
    ({"num_kv_blocks": 2.5}, r"num_kv_blocks must be an integer"),
    ({"enable_prefix_caching": "no"}, r"enable_prefix_caching must be a bool, got 'no'"),
    ({"enable_prefix_caching": 0}, r"enable_prefix_caching must be a bool"),
    ({"max_model_len": True}, r"max_model_len must be a positive integer or None, got True"),
    ({"max_model_len": 2048.0}, r"max_model_len must be a positive integer"),
    ({"use_triton": "yes"}, r"use_triton must be a bool or None, got 'yes'"),
    ({"use_cuda_graphs": None}, r"use_cuda_graphs must be a bool, got None"),
    ({"use_cuda_graphs": 1}, r"use_cuda_graphs must be a bool"),
    ({"kv_cache_memory": True}, r"kv_cache_memory must be a positive integer number of bytes, got True"),
    ({"kv_cache_memory": 1.5e9}, r"kv_cache_memory must be a positive integer number of bytes"),
    ({"kv_cache_memory": 0}, r"kv_cache_memory must be a positive integer"),
    ({"ray_address": 6379}, r"ray_address must be a string or None, got 6379"),
    ({"model": 7}, r"model must be a checkpoint directory or None, got 7"),
    ({"device": ["cpu"]}, r"device must be one of auto, cpu, cuda"),
    ({"dtype": None}, r"dtype must be one of auto, bfloat16, float16, float32, got None"),
    ({"block_size": "16"}, r"block_size must be a positive integer, got '16'"),
    ({"block_size": 24}, r"block_size must be a power of two, got 24"),
    ({"max_num_seqs": True}, r"max_num_seqs must be a positive integer"),
])
def test_engine_config_rejects_bad_values_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
    with pytest.raises(ValueError, match=message):  # the LLM(...) keyword path
        EngineConfig.from_kwargs(**kwargs)


def test_engine_config_accepts_the_documented_ranges():
    import numpy as np

    EngineConfig(seed=0)
    assert EngineConfig(seed=2 ** 64 - 1).seed == 2 ** 64 - 1  # torch.Generator.manual_seed's limit
    torch_gen = __import__("torch").Generator()
    torch_gen.manual_seed(EngineConfig(seed=2 ** 64 - 1).seed)
    config = EngineConfig(seed=np.int64(7), num_kv_blocks=np.int32(64), gpu_memory_utilization=1,
                          max_model_len=None, use_triton=None, ray_address="auto")
    assert (type(config.seed), type(config.num_kv_blocks), type(config.gpu_memory_utilization)) == (int, int, float)
    assert EngineConfig(model=pathlib.Path("/some/dir")).model == "/some/dir"
    assert EngineConfig(use_triton=False, use_cuda_graphs=False, enable_prefix_caching=False).use_triton is False


def test_engine_config_unknown_keyword_named():
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_kwargs(sed=1)
