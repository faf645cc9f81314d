"""QwenConfig: the real config.json files, the older field names, and clear errors."""
import json
import os

import pytest

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
