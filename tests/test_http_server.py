"""End-to-end tests of the OpenAI-compatible HTTP API: `qwenserve launch` as a subprocess on the
built-in tiny model, served from a Hugging Face cache the test lays out (HF_HUB_OFFLINE=1,
`--model qwenserve-test/qwen-tiny`), driven by the real `openai` package and raw httpx, and
checked against the offline engine in this process (greedy text and logprobs), the server's own
GetStats (blocks freed after a disconnect) and /metrics parsed by prometheus_client.
One server for the module (2 shared cores: each start costs tens of seconds)."""
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hf_cache import lay_out_hf_cache  # tests/ is on sys.path
from qwenserve.model.react import FunctionSpec, call_grammar
from qwenserve.sampling_params import SamplingParams
from qwenserve.structured_output import StructuredOutput
from qwenserve.server.client import QwenClient
from test_react import INSTRUCTION
from test_server import GREEDY, PROMPTS, STARTUP_TIMEOUT, Server, run_offline, wait_idle

REPO_ID = "qwenserve-test/qwen-tiny"
MAX_MODEL_LEN = 512  # room for the ReAct instruction of two tools (about 270 tokens)
# The same greedy settings over HTTP: OpenAI's fields plus vLLM's extras.
HTTP_GREEDY = dict(temperature=0.0, extra_body={"repetition_penalty": 1.0, "ignore_eos": True})


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    lay_out_hf_cache(cache, REPO_ID, tiny_checkpoint)
    srv = Server(tmp_path_factory.mktemp("server"), "--model", REPO_ID, "--max-model-len", str(MAX_MODEL_LEN),
                 env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def offline_engine():
    """The engine in this process with the server's model (the built-in one) and settings."""
    from qwenserve.config import EngineConfig
    from qwenserve.engine import LLMEngine

    return LLMEngine(EngineConfig(model=None, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
                                  kv_cache_memory=32 * 1024**2, seed=0))


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(server):
    with QwenClient(server.address) as c:
        yield c


def offline_chat(engine, messages, params, **kwargs):
    engine.add_request("offline-chat", messages=messages, params=params, **kwargs)
    while engine.has_unfinished_requests():
        final = [out for out in engine.step() if out.finished]
    return final[0].outputs[0]


def test_the_repo_id_is_served_from_the_offline_cache_with_a_startup_summary(server, client):
    assert [m.id for m in client.models.list().data] == [REPO_ID]
    summary = "\n".join(server.stdout_lines)
    assert f"model {REPO_ID} (" in summary and "KV cache " in summary and f"max_model_len {MAX_MODEL_LEN}" in summary
    assert f"curl {server.http_url}/v1/chat/completions" in summary
    assert f"qwenserve generate --address {server.address}" in summary
    assert httpx.get(server.http_url + "/health").json() == {"status": "ok"}


def test_greedy_completions_over_http_equal_the_offline_engine(client, offline_engine):
    prompts = PROMPTS[:3] + PROMPTS[-1:]
    expected = run_offline(offline_engine, prompts, SamplingParams(max_tokens=8, **GREEDY))
    whole = client.completions.create(model=REPO_ID, prompt=prompts, max_tokens=8, **HTTP_GREEDY)
    assert [c.text for c in whole.choices] == [text for text, _, _ in expected]
    assert all(c.finish_reason == "length" for c in whole.choices) and whole.usage.completion_tokens == 32
    streamed = {}
    for chunk in client.completions.create(model=REPO_ID, prompt=prompts, max_tokens=8, stream=True, **HTTP_GREEDY):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(len(prompts))] == [text for text, _, _ in expected]
    ids = client.completions.create(model=REPO_ID, prompt=offline_engine.tokenizer.encode(prompts[0]), max_tokens=8,
                                    **HTTP_GREEDY)
    assert ids.choices[0].text == expected[0][0]


def test_greedy_chat_over_http_equals_the_offline_engine(client, offline_engine):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"}]
    want = offline_chat(offline_engine, messages, SamplingParams(max_tokens=6, **GREEDY))
    got = client.chat.completions.create(model=REPO_ID, messages=messages, max_completion_tokens=6, **HTTP_GREEDY)
    assert got.choices[0].message.content == want.text and got.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=REPO_ID, messages=messages, max_tokens=6, stream=True,
                                                 **HTTP_GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text


def test_logprobs_over_http_match_the_engine(client, offline_engine):
    options = dict(max_tokens=4, temperature=1.5, seed=5, logprobs=2, ignore_eos=True)
    offline_engine.add_request("lp", prompt=PROMPTS[2], params=offline_engine.default_params(**options))
    while offline_engine.has_unfinished_requests():
        final = [out for out in offline_engine.step() if out.finished]
    want = final[0].outputs[0]
    got = client.completions.create(model=REPO_ID, prompt=PROMPTS[2], max_tokens=4, temperature=1.5, seed=5,
                                    logprobs=2, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    tok = offline_engine.tokenizer
    assert lp.tokens == [tok.id_to_bytes(t).decode("utf-8", "replace") for t in want.token_ids]
    for token, entry, sampled, top in zip(want.token_ids, want.logprobs, lp.token_logprobs, lp.top_logprobs):
        assert sampled == pytest.approx(dict(entry)[token], abs=1e-5)
        assert len(top) == len(entry)  # the top 2, and the sampled token when it is not among them
    chat = client.chat.completions.create(model=REPO_ID, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=5, temperature=0.8, seed=3, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10
    for choice in chat.choices:
        assert len(choice.logprobs.content) == 5
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in choice.logprobs.content)


def test_n2_streaming_with_include_usage(client):
    chunks = list(client.chat.completions.create(
        model=REPO_ID, messages=[{"role": "user", "content": "Tell me a story"}], n=2, max_tokens=5,
        temperature=0.8, seed=7, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 10


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the local time."}}


def test_tools_a_forced_call_and_the_result_round_trip(client, offline_engine):
    """The random model never writes ReAct by itself, so the call is forced (tool_choice names
    it): the reply is a tool call to that function, whose arguments are the model's greedy text
    under the grammar of that function's arguments (`react.call_grammar`).
    The result goes back as a tool message; the model then continues the ReAct turn written by
    hand below, exactly as the offline engine continues it."""
    question = {"role": "user", "content": "What is the weather in Paris?"}
    forced = client.chat.completions.create(model=REPO_ID, messages=[question], tools=[WEATHER, TIME],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=6, **HTTP_GREEDY)
    choice = forced.choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and choice.finish_reason in ("tool_calls", "length")
    opened = [{"role": "user", "content": INSTRUCTION + "\n\nQuestion: What is the weather in Paris?"},
              {"role": "assistant", "content": "Action: get_weather\nAction Input:"}]
    specs = [FunctionSpec(t["function"]["name"], t["function"]["description"], t["function"].get("parameters"))
             for t in (WEATHER, TIME)]
    arguments = StructuredOutput(grammar=call_grammar(specs, "arguments", "get_weather"))
    want = offline_chat(offline_engine, opened, SamplingParams(max_tokens=6, structured_output=arguments, **GREEDY),
                        continue_final_message=True)
    assert call.function.arguments == want.text.strip()
    assert want.text.startswith(' {"city":"')  # the grammar's shape: compact JSON, the required key
    history = [question,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.id, "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    reply = client.chat.completions.create(model=REPO_ID, messages=history, tools=[WEATHER, TIME], max_tokens=8,
                                           **HTTP_GREEDY)
    rendered = [{"role": "user", "content": INSTRUCTION + "\n\nQuestion: What is the weather in Paris?"},
                {"role": "assistant", "content": 'Thought: \nAction: get_weather\nAction Input: {"city": "Paris"}\n'
                                                 'Observation: {"temperature": 21}\nThought:'}]
    want = offline_chat(offline_engine, rendered, SamplingParams(max_tokens=8, stop=["Observation:"], **GREEDY),
                        continue_final_message=True)
    assert "\nAction:" not in want.text and "\nFinal Answer:" not in want.text  # premise: a plain thought
    assert reply.choices[0].message.content == want.text.strip()


def test_errors_name_the_field(server, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=REPO_ID, prompt="hi", temperature=-1)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=REPO_ID, prompt="hello " * (MAX_MODEL_LEN + 10))
    assert err.value.body["param"] == "prompt" and "max_model_len" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=REPO_ID, messages=[{"role": "robot", "content": "hi"}])
    assert err.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=REPO_ID, messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=REPO_ID, prompt=[151851])
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="qwen-tiny", prompt="hi")
    r = httpx.post(server.http_url + "/v1/completions", json={"prompt": "x" * (9 << 20)}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.completions.create(model=REPO_ID, prompt="still alive?", max_tokens=1).choices[0].text is not None


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)  # blocks never freed: wait_idle spins until then
def test_a_disconnect_aborts_the_request_and_frees_its_blocks(server, grpc_client):
    before = wait_idle(grpc_client)["num_aborted_requests"]
    body = {"prompt": "Tell me a long story", "max_tokens": 200, "stream": True, "temperature": 0,
            "ignore_eos": True}
    with httpx.stream("POST", server.http_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert grpc_client.stats()["num_used_blocks"] > 0
    stats = wait_idle(grpc_client)
    assert stats["num_aborted_requests"] == before + 1
    with pytest.raises(httpx.ReadTimeout):  # not streaming: the client gives up while it runs
        httpx.post(server.http_url + "/v1/completions", json=dict(body, stream=False, max_tokens=250), timeout=0.5)
    assert wait_idle(grpc_client)["num_aborted_requests"] == before + 2


def scrape(server) -> dict:
    text = httpx.get(server.http_url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_http_and_grpc_requests(server, client, grpc_client):
    wait_idle(grpc_client)
    before = scrape(server)
    tok_prompt = client.completions.create(model=REPO_ID, prompt=[11, 12, 13], max_tokens=4, **HTTP_GREEDY)
    two = client.completions.create(model=REPO_ID, prompt=[21, 22], n=2, max_tokens=3, temperature=0.8, seed=1,
                                    extra_body={"ignore_eos": True})
    over_grpc = grpc_client.generate(prompt_token_ids=[31, 32, 33, 34], max_tokens=5, **GREEDY)
    after = scrape(server)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert tok_prompt.usage.completion_tokens + two.usage.completion_tokens == 4 + 6
    assert moved("qwenserve:prompt_tokens_total") == 3 + 2 + 4
    assert moved("qwenserve:generation_tokens_total") == 4 + 6 + len(over_grpc.token_ids)
    assert moved("qwenserve:request_success_total", finished_reason="length") == 1 + 2 + 1
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert moved(f"qwenserve:{histogram}_count") == 3, histogram
    assert moved("qwenserve:inter_token_latency_seconds_count") == 3 + 2 * 2 + 4
    # One request at a time: steps of 1 prefill + (max_tokens - 1) decodes; tokens: the prompt
    # (per completion), then one per completion and decode step.
    assert moved("qwenserve:iteration_tokens_total_count") == 4 + 3 + 5
    assert moved("qwenserve:iteration_tokens_total_sum") == (3 + 3) + (2 * 2 + 2 * 2) + (4 + 4)
    assert moved("qwenserve:prefix_cache_queries_total", replica="0") == 3 + 2 * 2 + 4  # prompt tokens per admission
    one_core = (("replica", "0"),)
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[(f"qwenserve:{gauge}", one_core)] == 0.0  # idle again
    assert after[("qwenserve:num_requests_pending", ())] == 0.0
    assert after[("qwenserve:engine_core_up", one_core)] == 1.0
    assert ("qwenserve:num_preemptions_total", one_core) in after
    assert ("qwenserve:prefix_cache_hits_total", one_core) in after
    stats = grpc_client.stats()  # GetStats keeps working beside /metrics
    assert stats["num_total_blocks"] > 0


def test_request_log_lines_and_tokenize(server, client):
    reply = client.completions.create(model=REPO_ID, prompt=[5, 6, 7], max_tokens=2, **HTTP_GREEDY)
    deadline = time.monotonic() + 30
    while f"request {reply.id} (http) finished" not in server.stderr_path.read_text():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    line = next(l for l in server.stderr_path.read_text().splitlines() if f"request {reply.id} (http)" in l)
    assert "prompt_tokens=3 completion_tokens=2 ttft=" in line and line.endswith("finish=length")
    assert "(grpc) finished" in server.stderr_path.read_text()  # gRPC requests are logged too
    from qwenserve.model.tokenizer import QwenTokenizer

    r = httpx.post(server.http_url + "/tokenize", json={"prompt": "Hello, 世界"}).json()
    assert r["tokens"] == QwenTokenizer.from_dir(None).encode("Hello, 世界") and r["count"] == len(r["tokens"])
    assert httpx.post(server.http_url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello, 世界"}


@pytest.mark.parametrize("script,flag", [("http_client.py", "--base-url"), ("grpc_client.py", "--address")])
def test_the_examples_run_against_the_server(server, script, flag):
    import subprocess
    import sys

    from test_server import REPO, _env

    target = server.http_url if flag == "--base-url" else server.address
    out = subprocess.run([sys.executable, str(REPO / "examples" / script), flag, target, "--max-tokens", "4"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "model: " in out.stdout and "Traceback" not in out.stderr
    if script == "http_client.py":
        assert "the model calls get_weather(" in out.stdout and "the model answers:" in out.stdout


def test_launch_on_a_busy_http_port_fails_before_loading(server):
    import subprocess
    import sys

    from test_server import ENGINE_FLAGS, REPO, _env

    port = server.http_url.rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-m", "qwenserve.cli", "launch", "--port", "0", *ENGINE_FLAGS,
                          "--http-port", port], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}: address in use" in out.stderr, out.stderr
    assert "loading" not in out.stderr  # it failed before minutes of weight loading


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_sigterm_drains_http_streams_and_exits_0(tmp_path):
    """SIGTERM while an HTTP stream runs: /health turns 503 and new requests get 503 during the
    grace period, then the stream is aborted (its last event says finish_reason "abort", then
    [DONE]) and the process exits 0."""
    import json
    import signal
    import threading

    srv = Server(tmp_path, "--shutdown-grace", "3", "--max-model-len", "8192")
    events, started = [], threading.Event()

    def stream():
        body = {"prompt": "Count to a thousand", "max_tokens": 8000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.http_url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert started.wait(120), srv.log()
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while httpx.get(srv.http_url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "health still 200 after SIGTERM"
        r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "late", "max_tokens": 1})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    finally:
        rc = srv.stop(timeout=60)
        reader.join(60)
    assert rc == 0, srv.log()
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "abort"
    assert all(json.loads(e[len("data: "):])["choices"][0]["finish_reason"] is None for e in events[:-2])
