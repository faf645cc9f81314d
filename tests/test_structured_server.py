"""Structured output over gRPC: a `qwenserve launch` subprocess on the closer-preferring tiny
model (tests/structured_model.py), whose engine core runs in a process of its own, so every
structured request crosses the front end -> core boundary (msgspec) and is compiled on both
sides. Checked: validating outputs for schemas, regex and choice (greedy and seeded) equal to
the in-process engine's, the termination rule over the wire, n = 2, and INVALID_ARGUMENT naming
the field for every form that does not compile, with the server serving on.
"""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from qwenserve import LLM, SamplingParams, StructuredOutput
from qwenserve.server.client import QwenClient
from qwenserve.structured_output.vocabulary import END_TOKEN_IDS

from structured_model import write_closer_model
from test_server import Server, wait_idle
from test_structured_engine import PROMPT, SCHEMA, SCHEMAS

# Every option that changes logits is pinned: the server's defaults come from the checkpoint's
# generation_config.json (top_p 0.8, repetition_penalty 1.1), the offline engine's do not.
PINNED = dict(repetition_penalty=1.0, top_k=0, min_p=0.0)
GREEDY = dict(temperature=0.0, top_p=1.0, **PINNED)
NAMES = ["person", "order", "function_call", "config_file", "ref_defs", "recursive_ref",
         "anyof_objects", "array_min_max", "escaped_keys", "unicode_enum", "pattern_in_object", "matrix"]
REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
CHOICE = ["positive", "negative", "neutral"]


def seeded(seed: int) -> dict:
    return dict(temperature=1.0, top_p=0.95, seed=seed, **PINNED)


@pytest.fixture(scope="module")
def closer_dir(tiny_checkpoint, tmp_path_factory) -> str:
    return write_closer_model(tiny_checkpoint, str(tmp_path_factory.mktemp("closer-model")))


@pytest.fixture(scope="module")
def server(closer_dir, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"), "--model", closer_dir)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    with QwenClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def offline(closer_dir):
    """The engine in this process on the same model and engine settings as the server."""
    llm = LLM(model=closer_dir, device="cpu", dtype="float32", max_model_len=256,
              kv_cache_memory=32 * 1024 ** 2, seed=0)
    yield llm
    llm.shutdown()


def offline_ids(llm, params: list) -> list:
    return [o.outputs[0].token_ids for o in llm.generate([PROMPT] * len(params), params, use_tqdm=False)]


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_schemas_validate_over_grpc_and_equal_the_offline_outputs(client, offline, sampling):
    options = [GREEDY if sampling == "greedy" else seeded(i) for i in range(len(NAMES))]
    with ThreadPoolExecutor(len(NAMES)) as pool:  # concurrent streams: batched by the engine
        results = list(pool.map(lambda n, o: client.generate(PROMPT, max_tokens=96, json_schema=SCHEMA[n],
                                                             timeout=300, **o), NAMES, options))
    for name, result in zip(NAMES, results):
        assert result.finish_reason == "stop", (name, result.text)
        assert result.token_ids[-1] in END_TOKEN_IDS
        jsonschema.validate(json.loads(result.text), SCHEMA[name])
    expected = offline_ids(offline, [SamplingParams(max_tokens=96, **o, structured_output=StructuredOutput(
        json_schema=SCHEMA[n])) for n, o in zip(NAMES, options)])
    assert [r.token_ids for r in results] == expected


def test_regex_choice_grammar_and_json_object_over_grpc(client):
    assert re.fullmatch(REGEX, client.generate(PROMPT, max_tokens=48, regex=REGEX, **seeded(5)).text)
    assert client.generate(PROMPT, max_tokens=48, choice=CHOICE, **GREEDY).text in CHOICE
    text = client.generate(PROMPT, max_tokens=48, grammar='start: "(" NUMBER ")"\nNUMBER: /[1-9][0-9]{0,2}/',
                           **GREEDY).text
    assert re.fullmatch(r"\([1-9][0-9]{0,2}\)", text), text
    assert isinstance(json.loads(client.generate(PROMPT, max_tokens=48, json_object=True, **GREEDY).text), dict)
    # Free whitespace over the wire: still valid.
    result = client.generate(PROMPT, max_tokens=96, json_schema=SCHEMA["order"], disable_any_whitespace=False,
                             **seeded(9))
    jsonschema.validate(json.loads(result.text), SCHEMA["order"])


def test_termination_rule_and_n_over_grpc(client):
    plain = client.generate(PROMPT, max_tokens=96, json_schema=SCHEMA["person"], **GREEDY)
    middle = plain.text[len(plain.text) // 2:][:3]
    ruled = client.generate(PROMPT, max_tokens=96, json_schema=SCHEMA["person"], ignore_eos=True,
                            stop=[middle, '"'], stop_token_ids=[plain.token_ids[0]], **GREEDY)
    assert (ruled.text, ruled.token_ids, ruled.finish_reason) == (plain.text, plain.token_ids, "stop")
    cut = client.generate(PROMPT, max_tokens=4, json_schema=SCHEMA["person"], **GREEDY)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4
    two = client.generate(PROMPT, max_tokens=96, json_schema=SCHEMA["order"], n=2, **seeded(11))
    assert len(two.outputs) == 2
    for completion in two.outputs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), SCHEMA["order"])


@pytest.mark.parametrize("form, value, field", [
    ("json_schema", {"type": "integer", "minimum": 5, "maximum": 1}, "structured_output.json_schema"),
    ("json_schema", {"type": "string", "format": "no-such-format"}, "structured_output.json_schema"),
    ("json_schema", "{not json", "structured_output.json_schema"),
    ("regex", "(unclosed", "structured_output.regex"),
    ("regex", "[^\\s\\S]", "structured_output.regex"),
    ("grammar", "start: undefined_rule", "structured_output.grammar"),
    ("grammar", 'start: "a" <|im_end|>', "structured_output.grammar"),
    ("choice", [], "structured_output.choice"),
    ("choice", ["ok", ""], "structured_output.choice"),
])
def test_invalid_structures_are_invalid_argument_naming_the_field(client, form, value, field):
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPT, max_tokens=8, timeout=60, **{form: value})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(field), info.value.details()
    assert client.generate(PROMPT, max_tokens=8, choice=["still", "here"], **GREEDY).text in ("still", "here")
    stats = wait_idle(client)
    assert stats["num_aborted_requests"] == 0  # refused before anything was queued
