"""Structured output over gRPC and HTTP: a `qwenserve launch` subprocess on the closer-preferring tiny
model (tests/structured_model.py), whose engine core runs in a process of its own, so every
structured request crosses the front end -> core boundary (msgspec) and is compiled on both
sides. Checked: validating outputs for schemas, regex and choice (greedy and seeded) equal to
the in-process engine's, the termination rule over the wire, n = 2, and INVALID_ARGUMENT naming
the field for every form that does not compile, with the server serving on. Over HTTP (the
real `openai` client): the whole schema suite through `response_format` and `guided_json`,
greedy equal to gRPC's text, seeded, streamed; regex / grammar / choice extras; 400 naming the
request's field for every bad form.
"""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
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
NAMES = [s["name"] for s in SCHEMAS]  # the whole suite (60 schemas)
REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
CHOICE = ["positive", "negative", "neutral"]


def seeded(seed: int) -> dict:
    return dict(temperature=1.0, top_p=0.95, seed=seed, **PINNED)


@pytest.fixture(scope="module")
def closer_dir(tiny_checkpoint, tmp_path_factory) -> str:
    return write_closer_model(tiny_checkpoint, str(tmp_path_factory.mktemp("closer-model")))


@pytest.fixture(scope="module")
def server(closer_dir, tmp_path_factory):
    # Room for Qwen's ReAct prompt (~200 tokens with two tools) and a call after it.
    srv = Server(tmp_path_factory.mktemp("server"), "--model", closer_dir, "--max-model-len", "1024")
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


# ---------------------------------------------------------------------------------------- HTTP
HTTP_PINNED = {"repetition_penalty": 1.0, "top_k": 0, "min_p": 0.0}


@pytest.fixture(scope="module")
def http(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        c.served_model = c.models.list().data[0].id  # the name requests must give
        yield c


def http_completion(http, prompt: str, extra: dict, seed=None, **fields):
    sampling = dict(temperature=0.0, top_p=1.0) if seed is None else dict(temperature=1.0, top_p=0.95, seed=seed)
    return http.completions.create(model=http.served_model, prompt=prompt, max_tokens=fields.pop("max_tokens", 96),
                                   extra_body=dict(HTTP_PINNED, **extra), **sampling, **fields).choices[0]


def test_schema_suite_over_http_response_format_equals_grpc(client, http, server):
    with ThreadPoolExecutor(16) as pool:
        choices = list(pool.map(lambda n: http.completions.create(
            model=http.served_model, prompt=PROMPT, max_tokens=96, temperature=0.0, top_p=1.0,
            extra_body=dict(HTTP_PINNED, response_format={"type": "json_schema", "json_schema": {
                "name": n, "schema": SCHEMA[n], "strict": True}})).choices[0], NAMES))
        over_grpc = list(pool.map(lambda n: client.generate(PROMPT, max_tokens=96, json_schema=SCHEMA[n],
                                                            timeout=300, **GREEDY), NAMES))
    for name, choice, expected in zip(NAMES, choices, over_grpc):
        assert choice.finish_reason == "stop", (name, choice.text)
        jsonschema.validate(json.loads(choice.text), SCHEMA[name])
        assert choice.text == expected.text, name


def test_schema_suite_seeded_over_http_chat(http):
    def chat(i_name):
        i, name = i_name
        return http.chat.completions.create(
            model=http.served_model, messages=[{"role": "user", "content": PROMPT}], max_tokens=96, temperature=1.0,
            top_p=0.95, seed=i, response_format={"type": "json_schema", "json_schema": {"name": "out",
                                                                                        "schema": SCHEMA[name]}},
            extra_body=HTTP_PINNED).choices[0]
    with ThreadPoolExecutor(16) as pool:
        choices = list(pool.map(chat, enumerate(NAMES)))
    for name, choice in zip(NAMES, choices):
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMA[name])


def test_streamed_chat_json_object_and_guided_json(http):
    stream = http.chat.completions.create(model=http.served_model, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=96, temperature=0.0, response_format={"type": "json_object"},
                                          stream=True, extra_body=HTTP_PINNED)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop" and isinstance(json.loads("".join(pieces)), dict), pieces
    # vLLM's guided_json, with free whitespace: still valid, and n = 2 gives two valid outputs.
    two = http.completions.create(model=http.served_model, prompt=PROMPT, max_tokens=96, temperature=1.0, seed=4, n=2,
                                  extra_body=dict(HTTP_PINNED, guided_json=json.dumps(SCHEMA["order"]),
                                                  disable_any_whitespace=False))
    assert len(two.choices) == 2
    for choice in two.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), SCHEMA["order"])


def test_guided_regex_grammar_and_choice_over_http(http):
    assert re.fullmatch(REGEX, http_completion(http, PROMPT, {"guided_regex": REGEX}, seed=5).text)
    assert http_completion(http, PROMPT, {"guided_choice": CHOICE}).text in CHOICE
    text = http_completion(http, PROMPT, {"guided_grammar": 'start: "(" NUMBER ")"\nNUMBER: /[1-9][0-9]{0,2}/'}).text
    assert re.fullmatch(r"\([1-9][0-9]{0,2}\)", text), text
    cut = http_completion(http, PROMPT, {"guided_json": SCHEMA["person"]}, max_tokens=4)
    assert cut.finish_reason == "length"


@pytest.mark.parametrize("extra, param, message_start", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format.json_schema.schema",
     "response_format.json_schema.schema: "),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "response_format.json_schema: "),
    ({"response_format": {"type": "xml"}}, "response_format.type", "response_format.type: "),
    ({"guided_json": "{not json"}, "guided_json", "guided_json: "),
    ({"guided_regex": "(unclosed"}, "guided_regex", "guided_regex: "),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "guided_grammar: "),
    ({"guided_choice": []}, "guided_choice", "guided_choice: "),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_regex", "guided_regex, guided_choice: "),
    ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": " *"}, "guided_whitespace_pattern",
     "guided_whitespace_pattern: "),
    ({"disable_any_whitespace": False}, "disable_any_whitespace", "disable_any_whitespace: "),
])
def test_bad_structured_fields_over_http_are_400_naming_the_field(http, client, extra, param, message_start):
    with pytest.raises(openai.BadRequestError) as info:
        http.completions.create(model=http.served_model, prompt=PROMPT, max_tokens=8, extra_body=extra)
    error = info.value.body
    assert error["param"] == param, error
    assert error["message"].startswith(message_start), error
    assert http_completion(http, PROMPT, {"guided_choice": ["still", "here"]}).text in ("still", "here")
    assert wait_idle(client)["num_aborted_requests"] == 0


def test_structured_output_with_tools_is_a_400_naming_the_field(http):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        http.chat.completions.create(model=http.served_model, messages=[{"role": "user", "content": "hi"}], tools=tools,
                                     response_format={"type": "json_object"}, max_tokens=8)
    assert info.value.body["param"] == "response_format"
    # tool_choice "none" offers no tools: the structure applies.
    reply = http.chat.completions.create(model=http.served_model, messages=[{"role": "user", "content": PROMPT}], tools=tools,
                                         tool_choice="none", response_format={"type": "json_object"},
                                         max_tokens=96, temperature=0.0, extra_body=HTTP_PINNED)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


# ------------------------------------------------------------------- a call the model must make
WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": WEATHER_PARAMETERS}},
         {"type": "function", "function": {"name": "get_time", "description": "The local time."}}]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": {"type": "object"}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(name: str, arguments: str, only=None) -> None:
    assert name in (only or PARAMETERS), name
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def test_tool_choice_required_always_calls_a_tool_with_valid_arguments(http):
    """The closer model left to itself ("auto") writes closers, never a call; with "required"
    (or a named function) every choice, greedy or seeded, whole or streamed, is a call to one of
    the tools whose arguments validate against that tool's parameters (jsonschema)."""
    def chat(**fields):
        sampling = dict(temperature=0.0, top_p=1.0) if "seed" not in fields else dict(temperature=1.0, top_p=0.95)
        return http.chat.completions.create(model=http.served_model, messages=QUESTION, tools=TOOLS, max_tokens=400,
                                            extra_body=HTTP_PINNED, **sampling, **fields)

    unmasked = chat(tool_choice="auto")
    assert unmasked.choices[0].message.tool_calls is None, unmasked  # premise: only the mask makes a call
    named = {"type": "function", "function": {"name": "get_weather"}}
    for reply, only in ((chat(tool_choice="required"), None), (chat(tool_choice="required", n=2, seed=3), None),
                        (chat(tool_choice=named, n=2, seed=4), ["get_weather"])):
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls", choice
            [call] = choice.message.tool_calls
            check_call(call.function.name, call.function.arguments, only)
    streamed = list(chat(tool_choice="required", n=2, seed=5, stream=True))
    for index in (0, 1):
        deltas = [tc for chunk in streamed for choice in chunk.choices if choice.index == index
                  for tc in choice.delta.tool_calls or ()]
        finish = [choice.finish_reason for chunk in streamed for choice in chunk.choices
                  if choice.index == index and choice.finish_reason]
        assert finish == ["tool_calls"]
        check_call(deltas[0].function.name, "".join(tc.function.arguments or "" for tc in deltas))
    legacy = http.chat.completions.create(model=http.served_model, messages=QUESTION, max_tokens=400,
                                          functions=[t["function"] for t in TOOLS], function_call="required",
                                          temperature=0.0, extra_body=HTTP_PINNED)
    assert legacy.choices[0].finish_reason == "function_call"
    check_call(legacy.choices[0].message.function_call.name, legacy.choices[0].message.function_call.arguments)


def test_a_required_call_whose_parameters_do_not_compile_is_a_400_naming_the_tools(http, client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}]
    with pytest.raises(openai.BadRequestError) as info:
        http.chat.completions.create(model=http.served_model, messages=QUESTION, tools=tools, tool_choice="required",
                                     max_tokens=8)
    assert info.value.body["param"] == "tools" and info.value.body["message"].startswith("tools: "), info.value.body
    assert wait_idle(client)["num_aborted_requests"] == 0
