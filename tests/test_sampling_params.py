"""Tests of SamplingParams: validation, normalisation, from_generation_config."""

import json
import math
from pathlib import Path

import pytest

from qwenserve.sampling_params import MAX_N, SamplingParams

# A copy of the real Qwen-7B-Chat generation_config.json.
REFERENCE_GEN_CFG = Path(__file__).parent / "data" / "configs" / "generation_config-chat.json"

# (field, bad value); each must raise ValueError whose message starts with the field name.
INVALID = [
    ("n", 0),
    ("n", -1),
    ("n", 1.5),
    ("n", "2"),
    ("n", 129),  # > MAX_N: one request must not flood the scheduler with completions
    ("n", 20000),
    ("temperature", -1.0),
    ("temperature", -1e-9),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", "hot"),
    ("temperature", None),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", "0.9"),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", "5"),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", None),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.01),
    ("presence_penalty", "x"),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 1.0),
    ("max_tokens", "16"),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("min_tokens", 0.5),
    ("stop", [""]),
    ("stop", ""),
    ("stop", [1, 2]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.5]),
    ("stop_token_ids", ["a"]),
    ("stop_token_ids", 5),
    ("ignore_eos", "yes"),
    ("ignore_eos", 1),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", 1.5),
    ("seed", "42"),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
    ("skip_special_tokens", None),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert str(err.value).startswith(field), str(err.value)


def test_error_message_format():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1.0$"):
        SamplingParams(temperature=-1)


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, [], [])
    assert (p.ignore_eos, p.seed, p.logprobs, p.skip_special_tokens) == (False, None, None, True)
    assert not p.is_greedy
    # Mutable defaults are not shared between instances.
    p.stop.append("x")
    assert SamplingParams().stop == []


def test_valid_edges_and_normalisation():
    p = SamplingParams(top_k=-1, stop="###", temperature=0, top_p=1, max_tokens=None,
                       min_tokens=100, seed=2**64 - 1, logprobs=20, stop_token_ids=(7, 8))
    assert p.top_k == 0
    assert p.stop == ["###"]
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.stop_token_ids == [7, 8]
    assert p.max_tokens is None and p.min_tokens == 100
    SamplingParams(min_p=1.0, presence_penalty=-2, frequency_penalty=2, logprobs=0, seed=0)
    SamplingParams(min_tokens=16, max_tokens=16)
    assert SamplingParams(n=MAX_N).n == MAX_N == 128


def test_is_greedy():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy


def test_from_generation_config_reference_file():
    gen_cfg = json.loads(REFERENCE_GEN_CFG.read_text())
    p = SamplingParams.from_generation_config(gen_cfg)
    assert p.top_p == pytest.approx(0.8)
    assert p.top_k == 0
    assert p.repetition_penalty == pytest.approx(1.1)
    assert p.max_tokens == 512
    assert p.temperature == 1.0  # do_sample true, no temperature key
    assert p.stop_token_ids == [151645, 151644]


def test_from_generation_config_overrides_and_do_sample():
    gen_cfg = json.loads(REFERENCE_GEN_CFG.read_text())
    p = SamplingParams.from_generation_config(gen_cfg, max_tokens=32, top_p=None, seed=7)
    assert p.max_tokens == 32 and p.top_p == pytest.approx(0.8) and p.seed == 7
    greedy = SamplingParams.from_generation_config({**gen_cfg, "do_sample": False})
    assert greedy.temperature == 0.0 and greedy.is_greedy
    # An explicit override still wins over do_sample=false.
    hot = SamplingParams.from_generation_config({**gen_cfg, "do_sample": False}, temperature=0.5)
    assert hot.temperature == 0.5
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    # Multi-token stop sequences cannot be stop ids and are skipped.
    p = SamplingParams.from_generation_config({"stop_words_ids": [[1, 2], [3]]})
    assert p.stop_token_ids == [3]
    with pytest.raises(ValueError, match="^top_p"):
        SamplingParams.from_generation_config(gen_cfg, top_p=2.0)
