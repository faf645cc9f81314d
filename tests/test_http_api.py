"""The HTTP front end (qwenserve/server/http) on uvicorn in this process, over a scripted engine
client: OpenAI's shapes through the real `openai` package, the raw SSE framing through httpx,
every error status with OpenAI's error object naming the field, function calling streamed and
not, and client disconnects aborting requests. The real engine behind it is in
test_http_server.py."""
import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from fake_engine import ScriptedEngineClient  # tests/ is on sys.path
from qwenserve.frontend.engine_client import QueueFull
from qwenserve.server.http import HttpServer, build_http_app
from qwenserve.server.metrics import MeteredEngineClient, ServerMetrics
from qwenserve.server.readiness import Readiness

KEY = "test-key"
MODEL = "qwen-test"


class InProcessServer:
    """The HTTP app on uvicorn, in a thread with its own event loop."""

    def __init__(self, engine: ScriptedEngineClient, ssl_certfile=None, ssl_keyfile=None, **app_kwargs):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.readiness = Readiness(engine)
        self.readiness.warm = True
        metrics = ServerMetrics(engine)
        app = build_http_app(MeteredEngineClient(engine, metrics, "http", log_requests=False), self.readiness,
                             MODEL, metrics=metrics, api_key=KEY, **app_kwargs)
        self.http = HttpServer(app, "127.0.0.1", 0, ssl_certfile, ssl_keyfile)
        self.http.bind()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.http.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30)
        self.url = self.http.url

    def call(self, fn):
        """Runs fn() on the server's loop (e.g. to set the engine's hold event)."""
        self.loop.call_soon_threadsafe(fn)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.http.stop(5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    srv = InProcessServer(ScriptedEngineClient())
    yield srv
    srv.close()


@pytest.fixture
def engine(server):
    """The server's scripted engine, reset to its default script for each test."""
    e = server.engine
    e.script, e.finish_reason, e.dead, e.accepting, e.hold = (lambda call: ["Hello", ",", " world"]), \
        (lambda call: "stop"), None, True, None
    e.calls.clear()
    e.aborted.clear()
    return e


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def post(server, path, body, key=KEY, timeout=30):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


def sse_payloads(response: httpx.Response) -> list:
    """The events of a raw SSE body, checking OpenAI's framing on the way."""
    body = response.text
    assert body.endswith("data: [DONE]\n\n") and body.count("data: [DONE]") == 1, body
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), body
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


# ---------------------------------------------------------------- the happy paths

def test_models_and_the_api_key(server, client, engine):
    assert [m.id for m in client.models.list().data] == [MODEL]
    for key in (None, "wrong"):
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert post(server, "/v1/completions", {"prompt": "hi"}, key=None).status_code == 401
    # Probes and scrapers need no key.
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_completions_prompt_shapes_n_and_usage(client, engine):
    one = client.completions.create(model=MODEL, prompt="Say hi", max_tokens=10)
    assert [c.text for c in one.choices] == ["Hello, world"] and one.choices[0].finish_reason == "stop"
    assert one.id.startswith("cmpl-") and one.object == "text_completion" and one.model == MODEL
    prompt_tokens = len(engine.tokenizer.encode("Say hi"))
    assert (one.usage.prompt_tokens, one.usage.completion_tokens, one.usage.total_tokens) == \
        (prompt_tokens, 3, prompt_tokens + 3)
    many = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert all(c.text == "Hello," and c.finish_reason == "length" for c in many.choices)
    assert many.usage.completion_tokens == 8
    client.completions.create(model=MODEL, prompt=[1, 2, 3])
    client.completions.create(model=MODEL, prompt=[[1, 2], [3]])
    inputs = [(c["prompt"], c["prompt_token_ids"]) for c in engine.calls]
    assert inputs == [("Say hi", None), ("a", None), ("b", None), (None, [1, 2, 3]), (None, [1, 2]), (None, [3])]


def test_every_sampling_field_reaches_the_engine(client, engine):
    client.completions.create(
        model=MODEL, prompt="x", max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop=["\n\n", "END"], seed=11,
        presence_penalty=0.5, frequency_penalty=-0.5, logprobs=2, user="me",
        extra_body=dict(top_k=5, min_p=0.1, repetition_penalty=1.2, min_tokens=1, ignore_eos=True,
                        stop_token_ids=[151645], skip_special_tokens=False))
    p = engine.calls[-1]["params"]
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed, p.presence_penalty, p.frequency_penalty,
            p.logprobs, p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.ignore_eos, p.stop_token_ids,
            p.skip_special_tokens) == (7, 0.5, 0.9, 2, ["\n\n", "END"], 11, 0.5, -0.5, 2, 5, 0.1, 1.2, 1, True,
                                       [151645], False)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                   max_completion_tokens=3, stop="STOP", logprobs=True, top_logprobs=4)
    p = engine.calls[-1]["params"]
    assert (p.max_tokens, p.stop, p.logprobs) == (3, ["STOP"], 4)
    # Unset fields: the checkpoint's generation_config defaults, as over gRPC (none here).
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert engine.calls[-1]["params"] == engine.default_params()


def test_chat_streaming_and_not(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, n=2)
    assert [c.message.content for c in reply.choices] == ["Hello, world"] * 2
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    # Without tools the engine gets the conversation itself, as gRPC's chat input.
    assert engine.calls[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi\nthere"}]
    assert engine.calls[-1]["system"] is None and not engine.calls[-1]["continue_final_message"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing(server, engine):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "stream": True, "n": 2,
                                          "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r)
    for e in events[:-1]:
        assert set(e) == {"id", "object", "created", "model", "choices", "usage"} and e["usage"] is None
        assert e["object"] == "text_completion" and len(e["choices"]) == 1
        assert set(e["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    for i in (0, 1):
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == "Hello, world"
        assert [c["finish_reason"] for c in mine] == [None, None, "stop"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})
    events = sse_payloads(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"] for e in events[1:]] == [
        {"content": "Hello"}, {"content": ","}, {"content": " world"}, {}]
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in events[-1]
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_logprobs_shapes(client, engine):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [e.token for e in content] == ["Hello", ",", " world"]
    hello = engine.tokenizer.encode("Hello")[0]
    assert content[0].logprob == -0.25 and content[0].bytes == list(b"Hello")
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [
        ("Hello", -0.25), (engine.tokenizer.decode([hello + 1]), -1.5)]
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    text = client.completions.create(model=MODEL, prompt="x", logprobs=1)
    lp = text.choices[0].logprobs
    assert lp.tokens == ["Hello", ",", " world"] and lp.token_logprobs == [-0.25] * 3
    assert lp.text_offset == [0, 5, 6] and lp.top_logprobs[0] == {"Hello": -0.25}
    streamed = list(client.completions.create(model=MODEL, prompt="x", logprobs=1, stream=True))
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == [0, 5, 6]


# ---------------------------------------------------------------- errors

BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": True}, "n"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": "eos"}, "stop_token_ids"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(unclosed"}, "guided_regex"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS, ids=[f"{p}:{param}" for p, _, param in BAD_REQUESTS])
def test_bad_input_is_400_naming_the_field(server, engine, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(param), error
    assert "Traceback" not in r.text
    assert engine.aborted == []  # nothing reached the engine, or it was refused before it ran


def test_engine_validation_errors_name_the_request_field(server, engine):
    """The engine's own checks (prompt length, chat roles) come back naming the field."""
    engine.script = lambda call: ValueError("prompt: 300 tokens leave no room to generate within max_model_len (256)")
    r = post(server, "/v1/completions", {"prompt": [1, 2, 3]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    engine.script = lambda call: ValueError("messages[1].role: unknown role 'robot'")
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role"
    engine.script = lambda call: ValueError("prompt: the prompt is empty")
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert r.json()["error"]["param"] == "messages" and r.json()["error"]["message"].startswith("messages: ")


def test_not_json_wrong_model_unknown_route_too_large_queue_full_and_unavailable(server, client, engine):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x")
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    r = httpx.get(server.url + "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=MODEL, prompt="x" * (9 * 1024 * 1024))
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    engine.script = lambda call: QueueFull("waiting queue is full (4096 of max_waiting_requests=4096 taken)")
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL, prompt="x")
    assert "max_waiting_requests" in err.value.body["message"]
    engine.script = lambda call: ["x"]
    engine.dead = "RuntimeError: device lost"
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503 and "device lost" in err.value.body["message"]
    assert httpx.get(server.url + "/health").status_code == 503
    engine.dead = None
    for flag, value, reason in (("draining", True, "shutting down"), ("warm", False, "warming up")):
        setattr(server.readiness, flag, value)
        try:
            r = post(server, "/v1/completions", {"prompt": "x"})
            assert r.status_code == 503 and reason in r.json()["error"]["message"]
            assert httpx.get(server.url + "/health").status_code == 503
        finally:
            setattr(server.readiness, flag, not value)
    assert httpx.get(server.url + "/health").status_code == 200


def test_tokenize_and_detokenize(server, engine):
    ids = engine.tokenizer.encode("Hello, 世界")
    assert post(server, "/tokenize", {"prompt": "Hello, 世界"}).json() == {"count": len(ids), "max_model_len": 256,
                                                                          "tokens": ids}
    from qwenserve.model.chat_template import encode_chat
    messages = [{"role": "user", "content": "hi"}]
    assert post(server, "/tokenize", {"messages": messages}).json()["tokens"] == encode_chat(engine.tokenizer, messages)
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": "Hello, 世界"}
    r = post(server, "/detokenize", {"tokens": [10 ** 7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert post(server, "/tokenize", {}).json()["error"]["param"] == "prompt"


# ---------------------------------------------------------------- function calling

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
REACT_CALL = ["Thought: I should look", " it up.\nAct", "ion: get_", "weather\nAction In", 'put: {"city": ',
              '"Paris"}\n']
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}


def test_tool_call_whole_and_streamed(client, engine):
    engine.script = lambda call: REACT_CALL
    reply = client.chat.completions.create(model=MODEL, messages=[QUESTION], tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I should look it up."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    sent = engine.calls[-1]
    assert sent["params"].stop == ["Observation:"] and sent["system"] == "You are a helpful assistant."
    assert sent["messages"][0]["content"].startswith("Answer the following questions as best you can.")
    assert sent["messages"][0]["content"].endswith("\n\nQuestion: What is the weather in Paris?")
    chunks = list(client.chat.completions.create(model=MODEL, messages=[QUESTION], tools=[WEATHER_TOOL],
                                                 stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]
    assert content == "I should look it up."
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"city": "Paris"}'
    assert all(tc.index == 0 for tc in calls) and [tc.id for tc in calls if tc.id] == [calls[0].id]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_round_trip_and_final_answer(client, engine):
    engine.script = lambda call: [" I now know the final answer.\nFinal", " Answer: It is 21 C."]
    messages = [QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert reply.choices[0].message.content == "It is 21 C." and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.tool_calls is None
    sent = engine.calls[-1]
    assert sent["continue_final_message"] is True
    assert sent["messages"][-1] == {"role": "assistant", "content": (
        'Thought: \nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: {"temperature": 21}\nThought:')}
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "It is 21 C."


def test_forced_tool_legacy_functions_none_and_length(client, engine):
    engine.script = lambda call: [' {"city":', ' "Rome"}']
    forced = client.chat.completions.create(
        model=MODEL, messages=[QUESTION], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.choices[0].message.tool_calls[0].function.arguments == '{"city": "Rome"}'
    assert forced.choices[0].message.content is None
    assert engine.calls[-1]["messages"][-1] == {"role": "assistant", "content": "Action: get_weather\nAction Input:"}
    engine.script = lambda call: REACT_CALL
    legacy = client.chat.completions.create(model=MODEL, messages=[QUESTION], functions=[WEATHER_TOOL["function"]])
    assert legacy.choices[0].finish_reason == "function_call"
    assert legacy.choices[0].message.function_call.name == "get_weather"
    streamed = list(client.chat.completions.create(model=MODEL, messages=[QUESTION],
                                                   functions=[WEATHER_TOOL["function"]], stream=True))
    assert streamed[-1].choices[0].finish_reason == "function_call"
    assert "".join(c.choices[0].delta.function_call.arguments for c in streamed
                   if c.choices[0].delta.function_call) == '{"city": "Paris"}'
    none = client.chat.completions.create(model=MODEL, messages=[QUESTION], tools=[WEATHER_TOOL], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    assert engine.calls[-1]["messages"] == [QUESTION] and engine.calls[-1]["params"].stop == []
    # Cut off by max_tokens inside the call: the call so far, finish "length".
    cut = client.chat.completions.create(model=MODEL, messages=[QUESTION], tools=[WEATHER_TOOL], max_tokens=5)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls[0].function.arguments == \
        '{"city":'


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"name": "get\nweather"}}]}, "tools[0].function.name"),
    ({"functions": [{"name": " get_weather"}]}, "functions[0].name"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1]"),
    ({"tools": [WEATHER_TOOL], "functions": [WEATHER_TOOL["function"]]}, "functions"),
    ({"functions": [WEATHER_TOOL["function"]], "function_call": {"name": "nope"}}, "function_call"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
])
def test_bad_tools_are_400_naming_the_field(server, engine, body, param):
    r = post(server, "/v1/chat/completions", dict(body, messages=[QUESTION]))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---------------------------------------------------------------- request-size limits
# The gRPC servicer's limits (qwenserve/frontend/limits.py), resolved for the scripted engine's
# max_model_len of 256: written out here from their definitions.
PROMPT_CHARS = 128 * 255      # LONGEST_TOKEN_BYTES * (max_model_len - 1)
PROMPT_IDS = 255              # max_model_len - 1
CHAT_MESSAGES = (256 - 4) // 5  # (max_model_len - 1 - 3) // 5: the most ChatML turns that fit
OVER = "is over the server's limit of"


@pytest.mark.parametrize("path,body,param,message", [
    ("/v1/completions", {"prompt": "a" * (PROMPT_CHARS + 1)}, "prompt",
     f"prompt: {PROMPT_CHARS + 1} characters {OVER} {PROMPT_CHARS}"),
    ("/v1/completions", {"prompt": ["ok", "a" * (PROMPT_CHARS + 1)]}, "prompt",
     f"prompt: {PROMPT_CHARS + 1} characters {OVER} {PROMPT_CHARS}"),
    ("/v1/completions", {"prompt": [1] * (PROMPT_IDS + 1)}, "prompt",
     f"prompt: {PROMPT_IDS + 1} token ids {OVER} {PROMPT_IDS}"),
    ("/v1/completions", {"prompt": "hi", "stop": ["s"] * 17}, "stop", f"stop: 17 strings {OVER} 16"),
    ("/v1/completions", {"prompt": "hi", "stop": "s" * 513}, "stop[0]", f"stop[0]: 513 characters {OVER} 512"),
    ("/v1/chat/completions", {"messages": [QUESTION], "stop": ["ok", "s" * 513]}, "stop[1]",
     f"stop[1]: 513 characters {OVER} 512"),
    ("/v1/chat/completions", {"messages": [QUESTION], "stop_token_ids": [1] * 257}, "stop_token_ids",
     f"stop_token_ids: 257 ids {OVER} 256"),
    ("/v1/chat/completions", {"messages": [QUESTION] * (CHAT_MESSAGES + 1)}, "messages",
     f"messages: {CHAT_MESSAGES + 1} messages {OVER} {CHAT_MESSAGES}"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "c" * PROMPT_CHARS}]}, "messages",
     f"messages: {PROMPT_CHARS + 4} characters {OVER} {PROMPT_CHARS}"),
    # With tools, the rendered ReAct conversation counts: the instruction is part of it.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "c" * (PROMPT_CHARS - 100)}],
                              "tools": [WEATHER_TOOL]}, "messages", None),
    ("/tokenize", {"prompt": "a" * (PROMPT_CHARS + 1)}, "prompt",
     f"prompt: {PROMPT_CHARS + 1} characters {OVER} {PROMPT_CHARS}"),
    ("/tokenize", {"messages": [QUESTION] * (CHAT_MESSAGES + 1)}, "messages",
     f"messages: {CHAT_MESSAGES + 1} messages {OVER} {CHAT_MESSAGES}"),
])
def test_http_requests_get_the_grpc_servers_size_limits(server, engine, path, body, param, message):
    """Over a limit: 400 naming the field and the limit, before the engine sees anything."""
    calls = len(engine.calls)
    r = post(server, path, dict(body, model=MODEL) if path != "/tokenize" else body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and (message is None or error["message"] == message), error
    assert OVER in error["message"] and len(engine.calls) == calls


def test_http_requests_at_the_size_limits_pass(server, engine):
    for body in ({"prompt": "a" * PROMPT_CHARS}, {"prompt": [1] * PROMPT_IDS},
                 {"prompt": "hi", "stop": ["s" * 512] * 16, "stop_token_ids": [1] * 256}):
        r = post(server, "/v1/completions", dict(body, model=MODEL, max_tokens=1))
        assert r.status_code == 200, r.text
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [QUESTION] * CHAT_MESSAGES})
    assert r.status_code == 200, r.text


def test_the_body_limit_is_the_servers_max_request_bytes(server):
    """4 bytes per prompt character plus 1 MiB (frontend/limits.py): just over it is a 413
    before parsing, whatever the body holds."""
    limit = 4 * PROMPT_CHARS + (1 << 20)
    r = httpx.post(server.url + "/v1/completions", content=b" " * (limit + 1),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"].endswith(f"over the limit of {limit}"), r.text
    r = httpx.post(server.url + "/v1/completions", content=b" " * limit + b"x",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    r = httpx.post(server.url + "/v1/completions", content=b" " * (limit - 2) + b"{}",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code != 413, r.text


# ---------------------------------------------------------------- disconnects

def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "x", "stream": True}),
    ("/v1/chat/completions", {"messages": [QUESTION], "stream": True}),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}),
])
def test_a_client_that_disconnects_mid_stream_aborts_its_requests(server, engine, path, body):
    server.call(lambda: setattr(engine, "hold", asyncio.Event()))  # every stream stops after its first step
    wait_for(lambda: engine.hold is not None)
    with httpx.stream("POST", server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event is out
    wait_for(lambda: len(engine.aborted) == len(engine.calls))
    assert engine.aborted and engine.num_active == 0


def test_a_client_that_disconnects_before_a_whole_response_aborts_its_request(server, engine):
    server.call(lambda: setattr(engine, "hold", asyncio.Event()))
    wait_for(lambda: engine.hold is not None)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/chat/completions", {"messages": [QUESTION]}, timeout=0.5)
    wait_for(lambda: engine.aborted == [engine.calls[-1]["request_id"]])
    server.call(engine.hold.set)
    assert post(server, "/v1/completions", {"prompt": "x"}).status_code == 200


def test_tls_when_a_certificate_is_given(tmp_path):
    """ServerOptions.ssl_certfile/ssl_keyfile serve HTTPS (a certificate made here with openssl)."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    srv = InProcessServer(ScriptedEngineClient(), ssl_certfile=str(cert), ssl_keyfile=str(key))
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0,
                           http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert)))) as c:
            assert c.completions.create(model=MODEL, prompt="x").choices[0].text == "Hello, world"
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # no plain HTTP on that port
            httpx.get(srv.url.replace("https", "http") + "/health", timeout=5)
    finally:
        srv.close()


GENERATION_CONFIG = {"temperature": 0.7, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1, "max_new_tokens": 512,
                     "do_sample": True, "stop_words_ids": [[151645], [151644]]}


@pytest.mark.parametrize("fields", [
    {},
    {"max_tokens": 9, "temperature": 0.0},
    {"temperature": 1.3, "top_p": 0.5, "top_k": 7, "min_p": 0.05, "seed": 3, "n": 3, "stop": ["x", "yz"],
     "presence_penalty": 0.25, "frequency_penalty": -0.5, "repetition_penalty": 1.0, "min_tokens": 2,
     "stop_token_ids": [151643], "ignore_eos": True, "logprobs": 4, "skip_special_tokens": False},
])
def test_http_and_grpc_build_the_same_sampling_params(fields):
    """One validation path: the same fields over HTTP (/v1/completions) and over gRPC (the
    servicer's proto mapping) give equal SamplingParams, unset ones from generation_config."""
    from qwenserve.server import qwenserve_pb2 as pb
    from qwenserve.server.servicer import sampling_kwargs

    engine = ScriptedEngineClient(generation_config=GENERATION_CONFIG)
    srv = InProcessServer(engine)
    try:
        assert post(srv, "/v1/completions", dict(fields, prompt="x")).status_code == 200
    finally:
        srv.close()
    over_http = engine.calls[-1]["params"]
    over_grpc = engine.default_params(**sampling_kwargs(pb.SamplingParams(**fields)))
    assert over_http == over_grpc
    if not fields:
        assert (over_http.temperature, over_http.max_tokens, over_http.stop_token_ids) == (0.7, 512, [151645, 151644])


def test_a_disconnect_while_a_write_is_stuck_still_closes_the_body():
    """The client goes away while the response is blocked writing: the body iterator (and so
    the engine requests it reads) is closed at once, not left to the garbage collector."""
    from qwenserve.server.http.streaming import DisconnectAwareStreamingResponse

    closed = []

    async def body():
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        finally:
            closed.append(True)

    async def run():
        disconnect = asyncio.Event()
        sent = []

        async def send(message):
            sent.append(message)
            if message.get("body"):  # the first event: its write never completes
                disconnect.set()
                await asyncio.Event().wait()

        async def receive():
            await disconnect.wait()
            return {"type": "http.disconnect"}

        response = DisconnectAwareStreamingResponse(body(), media_type="text/event-stream")
        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send), 5)
        return sent, list(closed)  # before the loop's shutdown would finalize the generator anyway

    sent, closed_when_the_response_returned = asyncio.run(run())
    assert closed_when_the_response_returned == [True] and sent[-1]["body"] == b"data: 1\n\n"
