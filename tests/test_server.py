"""End-to-end tests of the gRPC server: `python -m qwenserve.cli launch` as a subprocess on
the built-in tiny model (CPU), driven through `qwenserve.server.client`, raw stubs and the
CLI. One server is shared by the module; the queue-overflow and SIGTERM tests start their
own because they need different flags or kill it.
"""
import asyncio
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli_run import run_cli  # tests/ is on sys.path
from qwenserve.server import gen_protos
from qwenserve.server.client import AsyncQwenClient, QwenClient

REPO = Path(__file__).resolve().parents[1]
# --http-port 0: any free port, so that test servers never collide on HTTP's default 8000.
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
                "--kv-cache-memory", "32MiB", "--seed", "0", "--http-port", "0"]
STARTUP_TIMEOUT = 300  # first run builds the tiny checkpoint; 2 slow cores load torch
# Greedy and the same everywhere: the server's defaults come from generation_config.json,
# so the comparison with the offline engine pins every parameter that changes logits.
GREEDY = dict(temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
PROMPTS = [f"Request {i}: the capital of country number {i * 7} is" for i in range(15)] + [
    "蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是"]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


class Server:
    """A `qwenserve launch --port 0` subprocess; `address` (gRPC) and `http_url` are parsed from
    its output; `env` is added to the environment."""

    def __init__(self, log_dir: Path, *flags: str, env=None):
        self.stderr_path = log_dir / f"server-{time.monotonic_ns()}.log"
        self.stdout_lines = []
        self._ready = threading.Event()
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "qwenserve.cli", "launch", "--port", "0",
                 *ENGINE_FLAGS, *flags],
                stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO, env=dict(_env(), **(env or {})))
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if not self._ready.wait(STARTUP_TIMEOUT) or self.proc.poll() is not None:
            self.stop(signal.SIGKILL)
            pytest.fail(f"server did not become ready:\n{self.log()}")
        ready = [line for line in self.stdout_lines if "ready" in line]
        self.address = ready[0].split(" on ")[1].split()[0]
        self.http_url = re.search(r"https?://\S+", ready[0]).group(0)  # "... and http://HOST:PORT (HTTP)"

    def _read_stdout(self):
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            if "ready" in line:
                self._ready.set()
        self._ready.set()  # exited: let the waiter see it

    def log(self) -> str:
        return "\n".join(self.stdout_lines) + "\n--- stderr ---\n" + self.stderr_path.read_text()[-4000:]

    def stop(self, sig=signal.SIGTERM, timeout=None) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def wait_idle(client: QwenClient) -> dict:
    """Polls GetStats until no request holds KV blocks or sits in a queue (a server that never
    goes idle is left to the test's pytest timeout)."""
    while True:
        stats = client.stats()
        if (stats["num_used_blocks"], stats["num_running"], stats["num_waiting"],
                stats["num_active_requests"]) == (0, 0, 0, 0):
            return stats
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    with QwenClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def offline_engine():
    """The engine in this process, same model (the built-in one) and config as the server."""
    from qwenserve.config import EngineConfig
    from qwenserve.engine import LLMEngine

    return LLMEngine(EngineConfig(model=None, device="cpu", dtype="float32", max_model_len=256,
                                  kv_cache_memory=32 * 1024**2, seed=0))


def run_offline(engine, prompts, params) -> list[tuple[str, list[int], str]]:
    """(text, token ids, finish reason) of each prompt's completion from `engine`."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"offline-{i}", prompt=prompt, params=params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                done[out.request_id] = (c.text, list(c.token_ids), c.finish_reason)
    return [done[f"offline-{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def offline_greedy(offline_engine):
    """Greedy completions of PROMPTS from the engine in this process."""
    from qwenserve.sampling_params import SamplingParams

    outs = run_offline(offline_engine, PROMPTS, SamplingParams(max_tokens=8, **GREEDY))
    return [(text, ids) for text, ids, _ in outs]


def test_health_is_serving_after_warm_up_and_ready_printed_once(server):
    assert sum("ready" in line for line in server.stdout_lines) == 1
    assert any(server.address in line for line in server.stdout_lines)
    assert "loading weights [" in server.stderr_path.read_text()  # the progress bar
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "qwenserve.v1.Generation"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"qwenserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_16_concurrent_streams_match_the_offline_engine(server, offline_greedy):
    barrier = threading.Barrier(len(PROMPTS))

    def stream(i):
        with QwenClient(server.address) as c:
            barrier.wait(timeout=30)
            return list(c.generate_stream(PROMPTS[i], max_tokens=8, timeout=120, **GREEDY))

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(stream, range(len(PROMPTS))))
    for i, deltas in enumerate(results):
        text, token_ids = offline_greedy[i]
        assert "".join(d.text for d in deltas) == text, PROMPTS[i]
        assert [t for d in deltas for t in d.token_ids] == token_ids, PROMPTS[i]
        assert all(not d.finish_reason for d in deltas[:-1])
        assert deltas[-1].finish_reason == "length"
        assert deltas[-1].completion_tokens == 8 and deltas[-1].prompt_tokens > 0
        assert len(deltas) >= 2  # streamed per step, not one final message


def test_client_generate_chat_n_and_tokenize(client, offline_greedy):
    result = client.generate(PROMPTS[0], max_tokens=8, **GREEDY)
    assert (result.text, result.token_ids) == offline_greedy[0]
    assert client.generate(prompt_token_ids=client.tokenize(PROMPTS[0]), max_tokens=8,
                           **GREEDY).token_ids == offline_greedy[0][1]
    sampled = client.generate("Once upon a time", n=2, max_tokens=5, temperature=0.8, seed=1,
                              ignore_eos=True)
    assert [c.index for c in sampled.outputs] == [0, 1]
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in sampled.outputs)
    with_logprobs = client.generate(PROMPTS[0], max_tokens=3, logprobs=2, **GREEDY)
    assert len(with_logprobs.outputs[0].logprobs) == 3
    for token, top in zip(with_logprobs.token_ids, with_logprobs.outputs[0].logprobs):
        assert len(top) >= 2 and top[0][0] == token and all(lp <= 0 for _, lp in top)
    reply = client.chat([{"role": "user", "content": "你好"}], system="You are a helpful assistant.",
                        max_tokens=4, **GREEDY)
    assert len(reply.token_ids) == 4
    from qwenserve.model.tokenizer import QwenTokenizer

    assert client.tokenize("Hello, 世界") == QwenTokenizer.from_dir(None).encode("Hello, 世界")
    info = client.model_info()
    assert info["max_model_len"] == 256 and info["block_size"] == 16 and info["num_kv_blocks"] > 0
    assert info["num_gpu_blocks"] == info["num_kv_blocks"]  # the old name, kept for old clients
    assert info["vocab_size"] >= 151851 and info["tensor_parallel_size"] == 1
    assert (info["dtype"], info["device"]) == ("float32", "cpu")


@pytest.mark.parametrize("n", [0, 2])
def test_logprobs_over_grpc_match_the_engine_and_include_the_sampled_token(client, offline_engine, n):
    """Each token's TokenLogprobs carries the top-N pairs, then the sampled token's pair when it
    is not among them (N=0: only the sampled token's), the same entries as the engine's."""
    options = dict(max_tokens=6, temperature=1.5, seed=5, logprobs=n, ignore_eos=True)
    got = client.generate(PROMPTS[2], **options).outputs[0]
    offline_engine.add_request(f"lp-{n}", prompt=PROMPTS[2], params=offline_engine.default_params(**options))
    while offline_engine.has_unfinished_requests():
        final = [out for out in offline_engine.step() if out.finished]
    want = final[0].outputs[0]
    assert got.token_ids == want.token_ids and len(got.logprobs) == len(got.token_ids) == 6
    appended = 0
    for token, entry, expected in zip(got.token_ids, got.logprobs, want.logprobs):
        assert [t for t, _ in entry] == [t for t, _ in expected]
        assert [lp for _, lp in entry] == pytest.approx([lp for _, lp in expected], abs=1e-5)
        top = [t for t, _ in entry[:n]]
        assert len(entry) == n + (token not in top) and token in [t for t, _ in entry]
        appended += token not in top
    assert appended > 0  # the sampled token's pair was added at least once


def test_async_client(server, offline_greedy):
    async def run():
        async with AsyncQwenClient(server.address) as c:
            deltas = [d async for d in c.generate_stream(PROMPTS[1], max_tokens=8, **GREEDY)]
            result = await c.generate(PROMPTS[1], max_tokens=8, **GREEDY)
            return deltas, result, await c.tokenize("hi"), await c.stats()

    deltas, result, ids, stats = asyncio.run(run())
    assert "".join(d.text for d in deltas) == result.text == offline_greedy[1][0]
    assert ids and stats["num_total_blocks"] > 0


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)  # blocks never freed: wait_idle spins until then
def test_cancelled_stream_aborts_and_frees_blocks(client):
    before = wait_idle(client)["num_aborted_requests"]
    stream = client.generate_stream("Tell me a long story", max_tokens=200, **GREEDY)
    next(stream), next(stream)
    assert client.stats()["num_used_blocks"] > 0
    stream.close()  # cancels the call
    stats = wait_idle(client)
    assert stats["num_aborted_requests"] == before + 1


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_deadline_aborts_and_frees_blocks(client):
    before = wait_idle(client)["num_aborted_requests"]
    with pytest.raises(grpc.RpcError) as err:
        client.generate("Tell me a long story", max_tokens=200, timeout=0.05, **GREEDY)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = wait_idle(client)
    assert stats["num_aborted_requests"] == before + 1


@pytest.mark.timeout(STARTUP_TIMEOUT + 180)
def test_calls_cancelled_or_timed_out_while_their_add_is_queued_never_kill_the_engine(server, client):
    """The engine is kept busy by long streams while many calls are cancelled, or reach their
    deadline, a few milliseconds after they start: some before the engine took their request,
    some after. Whatever the moment, only that request is aborted: the engine stays up, later
    calls succeed, health stays SERVING and every block is freed."""
    wait_idle(client)
    busy = [client.generate_stream(f"Keep the engine busy {i}", max_tokens=120, **GREEDY) for i in range(3)]
    for stream in busy:
        next(stream)

    async def hammer():
        async with AsyncQwenClient(server.address) as c:
            async def short_deadline(i):
                try:
                    await c.generate(f"deadline {i}", max_tokens=50, timeout=0.001 * (1 + i % 50), **GREEDY)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e

            async def cancelled(i):
                task = asyncio.ensure_future(c.generate(f"cancel {i}", max_tokens=50, **GREEDY))
                await asyncio.sleep(0.001 * (i % 30))
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

            await asyncio.gather(*[short_deadline(i) for i in range(60)], *[cancelled(i) for i in range(60)])

    asyncio.run(hammer())
    for stream in busy:
        assert list(stream)[-1].finish_reason == "length"
    assert client.generate("still alive?", max_tokens=2, **GREEDY).outputs[0].finish_reason == "length"
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    wait_idle(client)


BAD_INPUTS = [
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", n=0), "n"),
    (dict(prompt="hi", n=20000), "n"),  # above MAX_N (128)
    (dict(prompt=""), "prompt"),
    (dict(prompt="hello " * 300), "max_model_len"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "role"),
    (dict(prompt_token_ids=[151851]), "prompt_token_ids"),
]


@pytest.mark.parametrize("kwargs,field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(client, kwargs, field):
    kwargs = dict(kwargs)
    with pytest.raises(grpc.RpcError) as err:
        client.generate(kwargs.pop("prompt", None), **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details(), err.value.details()
    assert len(client.generate("still alive?", max_tokens=1).token_ids) == 1


def test_generate_command_streams_to_the_terminal(server, client):
    # The same options the command sends; everything else at the server's defaults.
    expected = client.generate("Hello", max_tokens=4, temperature=0.0).text
    out = subprocess.run(
        [sys.executable, "-m", "qwenserve.cli", "generate", "--address", server.address,
         "--max-tokens", "4", "--temperature", "0", "Hello"],
        capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_launch_on_a_busy_port_fails(server):
    port = server.address.rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-m", "qwenserve.cli", "launch", "--port", port, *ENGINE_FLAGS],
                         capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert out.returncode == 1 and "cannot listen" in out.stderr, out.stderr


@pytest.mark.parametrize("flags,message", [
    (["--model", "/nonexistent/qwen"], "model: '/nonexistent/qwen' does not exist"),
    (["--tp", "3"], "tensor_parallel_size 3 does not divide the 4 attention heads; valid values: 1, 2, 4"),
])
def test_launch_with_a_bad_model_or_setting_fails_cleanly(flags, message):
    out = subprocess.run([sys.executable, "-m", "qwenserve.cli", "launch", "--port", "0", *flags, *ENGINE_FLAGS],
                         capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_committed_stubs_match_a_fresh_generation():
    assert gen_protos.stale_stubs() == []


def test_stubs_a_user_generates_work_against_the_server(server, tmp_path, offline_engine):
    script = textwrap.dedent(f"""
        import json, sys
        from grpc_tools import protoc
        import importlib.resources
        include = str(importlib.resources.files("grpc_tools") / "_proto")
        assert protoc.main(["protoc", "-I{REPO / 'qwenserve/server/protos'}", "-I" + include,
                            "--python_out=.", "--grpc_python_out=.", "qwenserve.proto"]) == 0
        sys.path.insert(0, ".")
        import grpc, qwenserve_pb2 as pb, qwenserve_pb2_grpc as pb_grpc
        stub = pb_grpc.GenerationStub(grpc.insecure_channel("{server.address}"))
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        req = pb.GenerateRequest(prompt="Hello", params=pb.SamplingParams(max_tokens=8, temperature=0))
        msgs = list(stub.Generate(req, timeout=60))
        print(json.dumps({{"max_model_len": info.max_model_len,
                          "ids": [t for m in msgs for t in m.token_ids],
                          "finish": msgs[-1].finish_reason}}))
    """)
    # Only grpc/protobuf on the path, not the qwenserve checkout: the proto must stand alone.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    # The server fills what the request leaves unset from the checkpoint's generation_config.json;
    # the offline engine gets those values spelled out (temperature 0 makes top_p/top_k moot).
    from qwenserve.sampling_params import SamplingParams

    with open(os.path.join(offline_engine.model_dir, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["repetition_penalty"] == 1.1 and gen["stop_words_ids"] == [[151645], [151644]]
    params = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=gen["repetition_penalty"],
                            stop_token_ids=[ids[0] for ids in gen["stop_words_ids"]])
    [(_, ids, finish)] = run_offline(offline_engine, ["Hello"], params)
    assert finish == "length" and len(ids) == 8
    assert got == {"max_model_len": 256, "ids": ids, "finish": "length"}


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_queue_overflow_is_resource_exhausted(tmp_path):
    srv = Server(tmp_path, "--max-num-seqs", "1", "--max-waiting-requests", "1")
    try:
        with QwenClient(srv.address) as c:
            running = c.generate_stream("first", max_tokens=200, **GREEDY)
            next(running)  # running now; the engine takes no second sequence
            waiting = c.generate_stream("second", max_tokens=200, **GREEDY)
            waiter = concurrent.futures.ThreadPoolExecutor(1).submit(lambda: next(waiting, None))
            while c.stats()["num_waiting"] != 1:  # until the second one is queued
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as err:
                c.generate("third", max_tokens=1)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_waiting_requests" in err.value.details()
            running.close()
            waiter.result()
            waiting.close()
            wait_idle(c)
            assert len(c.generate("after", max_tokens=1).token_ids) == 1
            # Each of n completions takes a place in the queue: n=2 never fits in 1.
            with pytest.raises(grpc.RpcError) as err:
                c.generate("two", n=2, max_tokens=1)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "n=2" in err.value.details() and "max_waiting_requests" in err.value.details()
            assert c.stats()["num_waiting"] == 0
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)  # a server that waits out the streams hangs here
def test_sigterm_during_streams_exits_0_within_grace(tmp_path):
    """SIGTERM while 4 streams run: the server gives them the grace period, then aborts them, every
    client gets a final "abort" message, and the process exits 0. Each stream asks for 8000
    tokens (ignore_eos), thousands of decode steps that no machine runs within the 1.5 s grace,
    so the streams are still running when the grace ends, whatever the speed of the CPU."""
    grace, max_tokens = 1.5, 8000
    srv = Server(tmp_path, "--shutdown-grace", str(grace), "--max-model-len", "8192")
    streaming = [threading.Event() for _ in range(4)]

    def stream(i):
        with QwenClient(srv.address) as c:
            deltas = []
            for d in c.generate_stream("Count to a thousand", max_tokens=max_tokens, **GREEDY):
                deltas.append(d)
                streaming[i].set()
            return deltas

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        for event, future in zip(streaming, futures):  # every stream has its first tokens
            while not event.wait(0.05):
                assert not future.done(), future.result()
        assert not any(f.done() for f in futures)  # all four still open when the signal goes
        rc = srv.stop(signal.SIGTERM, timeout=None)
        results = [f.result() for f in futures]
    assert rc == 0, srv.log()
    # The server's own account of the moment shutdown began: the four were running.
    assert f"shutting down (4 running, grace {grace:g}s)" in srv.stderr_path.read_text(), srv.log()
    for deltas in results:
        assert all(not d.finish_reason for d in deltas[:-1])
        assert deltas[-1].finish_reason == "abort"
        assert 0 < sum(len(d.token_ids) for d in deltas) < max_tokens


# --- engine failure and warm-up, end to end ----------------------------------------------------

# `qwenserve launch` (through `cli.main`) with `app.build_engine` wrapped so that the real engine
# misbehaves on cue, per QWENSERVE_TEST_FAULT:
#   fail-warm-up:     every step raises;
#   hold-warm-up:     the first step (the warm-up's) waits for a line on stdin, then runs;
#   crash-on-command: the second step that runs a user request (its first token is out by then)
#                     waits for a line on stdin, then raises.
# Lines on stdin, not timers: the test decides when the engine moves on.
INJECTED = "engine failed: RuntimeError: injected engine failure"


class FaultyServer(Server):
    """`qwenserve launch --port 0` whose engine core fails or waits on cue
    (tests/fault_executor.py); `cue()` gives the cue. Waits until a stdout line contains
    `until` (or the process ends); `address` is None when no such line came."""

    def __init__(self, log_dir: Path, fault: str, until: str = "ready"):
        self.stderr_path = log_dir / f"server-{time.monotonic_ns()}.log"
        self.cue_path = log_dir / f"cue-{time.monotonic_ns()}"
        self.stdout_lines = []
        self._lines = threading.Condition()
        self._eof = False
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "qwenserve.cli", "launch", "--port", "0", *ENGINE_FLAGS,
                 "--executor-plugin", "tests.fault_executor:faulty_executor"],
                stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
                env=dict(_env(), QWENSERVE_TEST_FAULT=fault, QWENSERVE_TEST_FAULT_FILE=str(self.cue_path)))
        threading.Thread(target=self._read_stdout, daemon=True).start()
        line = self.wait_for(until)
        self.address = line.split(" on ")[1].split()[0] if line else None

    def _read_stdout(self):
        for line in self.proc.stdout:
            with self._lines:
                self.stdout_lines.append(line.rstrip("\n"))
                self._lines.notify_all()
        with self._lines:
            self._eof = True
            self._lines.notify_all()

    def wait_for(self, text: str):
        """The first stdout line containing `text`, or None once stdout closed without one."""
        def found():
            return next((line for line in self.stdout_lines if text in line), None)

        with self._lines:
            if not self._lines.wait_for(lambda: found() or self._eof, STARTUP_TIMEOUT):
                self.stop(signal.SIGKILL)
                pytest.fail(f"no {text!r} line from the server:\n{self.log()}")
            return found()

    def cue(self) -> None:
        self.cue_path.touch()


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)  # a failure that never reaches a call hangs here
def test_engine_failure_is_unavailable_for_every_call_and_health_turns_not_serving(tmp_path):
    """The engine's step raises while one request streams and another waits behind it: both
    calls end UNAVAILABLE naming the failure, every later Generate is UNAVAILABLE,
    health (watched over gRPC) goes SERVING -> NOT_SERVING for the service and the server, and
    the process stays up (for an orchestrator to see the failure) until SIGTERM, exit 0."""
    srv = FaultyServer(tmp_path, "crash-on-command")
    try:
        assert srv.address, srv.log()
        service = "qwenserve.v1.Generation"
        with QwenClient(srv.address) as c, grpc.insecure_channel(srv.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            running = c.generate_stream("a long story", max_tokens=200, **GREEDY)
            first = next(running)  # the engine now waits inside its next step
            assert first.token_ids and not first.finish_reason
            queued = concurrent.futures.ThreadPoolExecutor(1).submit(
                lambda: c.generate("queued behind the failure", max_tokens=1))
            while c.stats()["num_active_requests"] != 2:  # the second call is in, waiting
                time.sleep(0.01)
            srv.cue()
            with pytest.raises(grpc.RpcError) as in_flight:
                list(running)
            with pytest.raises(grpc.RpcError) as pending:
                queued.result()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.RpcError) as later:
                c.generate("after the failure", max_tokens=1)
            for err in (in_flight, pending, later):
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
                assert INJECTED in err.value.details(), err.value.details()
            # Set second of the two: the overall server ("") is NOT_SERVING too by now.
            assert _health(srv.address, "") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert srv.proc.poll() is None
            assert c.stats()["num_active_requests"] == 0  # the failure released both calls
    finally:
        assert srv.stop() == 0, srv.log()
    assert "engine failed, health is NOT_SERVING" in srv.stderr_path.read_text(), srv.log()


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_calls_before_the_warm_up_finished_are_unavailable(tmp_path, offline_greedy):
    """While the warm-up generation is held inside the engine's first step, the port is open
    but Generate is UNAVAILABLE and health NOT_SERVING; once it is let go, "ready" is printed,
    health is SERVING and Generate gives the offline engine's greedy completion."""
    srv = FaultyServer(tmp_path, "hold-warm-up", until="(warming up)")
    try:
        assert srv.address, srv.log()
        with QwenClient(srv.address) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate(PROMPTS[0], max_tokens=8, **GREEDY)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not ready" in err.value.details(), err.value.details()
            for service in ("", "qwenserve.v1.Generation"):
                assert _health(srv.address, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not any("ready" in line for line in srv.stdout_lines)
            srv.cue()
            assert srv.wait_for("ready on"), srv.log()
            for service in ("", "qwenserve.v1.Generation"):
                assert _health(srv.address, service) == health_pb2.HealthCheckResponse.SERVING
            result = c.generate(PROMPTS[0], max_tokens=8, **GREEDY)
            assert (result.text, result.token_ids) == offline_greedy[0]
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_launch_exits_1_when_the_warm_up_fails(tmp_path):
    srv = FaultyServer(tmp_path, "fail-warm-up", until="ready on")
    rc = srv.proc.wait()
    srv.stop()
    assert srv.address is None, srv.log()  # never reported ready
    assert rc == 1, srv.log()
    assert any("(warming up)" in line for line in srv.stdout_lines), srv.log()  # it got that far
    stderr = srv.stderr_path.read_text()
    assert f"qwenserve: error: warm-up failed: engine failed during warm-up: RuntimeError: " \
           f"injected engine failure" in stderr, srv.log()


# --- `qwenserve generate` against the running server --------------------------------------------

def test_generate_command_chat_and_system_match_the_client(server, client, capsys):
    """--chat sends PROMPT as a user message and --system the system prompt: the streamed text
    is the client's chat() reply for the same request (greedy), plus the final newline."""
    question, system = "你好, who are you?", "You are a terse assistant."
    options = ["--address", server.address, "--max-tokens", "6", "--temperature", "0"]
    expected = {
        "plain": client.generate(question, max_tokens=6, temperature=0.0).text,
        "chat": client.chat([{"role": "user", "content": question}], max_tokens=6, temperature=0.0).text,
        "system": client.chat([{"role": "user", "content": question}], system=system, max_tokens=6,
                              temperature=0.0).text,
    }
    # Each flag changes the reply, so a command that dropped one would print another text.
    assert len(set(expected.values())) == 3, expected
    for flags, key in ((["--chat"], "chat"), (["--chat", "--system", system], "system")):
        code, out, err = run_cli(capsys, "generate", *options, *flags, question)
        assert code == 0, err
        assert out == expected[key] + "\n", (flags, out, expected)


def test_generate_command_stop_strings_match_the_client(server, client, capsys):
    """Every --stop (repeatable) reaches the server: two stop strings from the free greedy text,
    given in either order, end it at the earlier one, as the client's result does."""
    prompt = PROMPTS[3]
    full = client.generate(prompt, max_tokens=12, temperature=0.0).text

    def clean_pair(start):  # the first two visible characters from `start` on (no U+FFFD)
        return next(full[i:i + 2] for i in range(start, len(full) - 1)
                    if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())

    early = clean_pair(len(full) // 3)
    late = clean_pair(full.index(early) + 2)
    assert full.index(early) < full.index(late), (full, early, late)
    expected = client.generate(prompt, max_tokens=12, temperature=0.0, stop=[late, early])
    assert expected.finish_reason == "stop" and expected.text == full[:full.index(early)]
    for stops in ([early, late], [late, early]):  # a command keeping only one --stop fails one order
        code, out, err = run_cli(capsys, "generate", "--address", server.address, "--max-tokens", "12",
                                 "--temperature", "0", "--stop", stops[0], "--stop", stops[1], prompt)
        assert code == 0, err
        assert out == expected.text + "\n", (stops, out)


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)  # blocks never freed: wait_idle spins until then
def test_generate_command_timeout_is_the_calls_deadline(server, client, capsys):
    expected = client.generate("Hello", max_tokens=4, temperature=0.0).text
    code, out, err = run_cli(capsys, "generate", "--address", server.address, "--timeout", "120",
                             "--max-tokens", "4", "--temperature", "0", "Hello")
    assert code == 0 and out == expected + "\n", err
    # 1 ms for 200 tokens: the deadline passes first, and the command says so (exit 1).
    code, out, err = run_cli(capsys, "generate", "--address", server.address, "--timeout", "0.001",
                             "--max-tokens", "200", "--temperature", "0", "Tell me a long story")
    assert code == 1 and "qwenserve generate: error: DEADLINE_EXCEEDED" in err, (code, err)
    assert "Traceback" not in err
    wait_idle(client)  # whatever reached the server was aborted and freed


def test_generate_command_reads_the_prompt_from_stdin(server, client):
    """PROMPT '-': the whole of standard input (every line, non-ASCII text) is the prompt."""
    prompt = "蒙古国的首都是乌兰巴托\nsecond line: and the capital of Iceland is\n"
    expected = client.generate(prompt, max_tokens=6, temperature=0.0).text
    first_line = client.generate(prompt.splitlines()[0], max_tokens=6, temperature=0.0).text
    assert expected != first_line  # reading only a line would show
    out = subprocess.run(
        [sys.executable, "-m", "qwenserve.cli", "generate", "--address", server.address,
         "--max-tokens", "6", "--temperature", "0", "-"],
        input=prompt.encode("utf-8"), capture_output=True, cwd=REPO,
        env=dict(_env(), PYTHONIOENCODING="utf-8"), timeout=120)
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")
    assert out.stdout.decode("utf-8") == expected + "\n"


# --- skip_special_tokens over gRPC -------------------------------------------------------------

# Greedy on the built-in model, these one-token prompts start their completion with a special
# token (ids >= 151643: <|extra_56|>, <|extra_18|>), found by searching the model's greedy
# next token over the first 4096 ids; the test checks that this still holds.
SPECIAL_FIRST_PROMPTS = [[838], [3354]]


@pytest.mark.parametrize("prompt_token_ids", SPECIAL_FIRST_PROMPTS, ids=str)
def test_skip_special_tokens_over_grpc(client, offline_engine, prompt_token_ids):
    """SamplingParams.skip_special_tokens reaches the detokenizer: False writes the special
    tokens' names into the text, True (and unset: the default) leaves them out, and the token
    ids are the same either way; each text equals QwenTokenizer.decode of the ids."""
    from qwenserve.model.tokenizer import QwenTokenizer

    tok = QwenTokenizer.from_dir(None)
    results = {skip: client.generate(prompt_token_ids=prompt_token_ids, max_tokens=6,
                                      skip_special_tokens=skip, **GREEDY)
               for skip in (False, True, None)}
    ids = results[None].token_ids
    assert [r.token_ids for r in results.values()] == [ids] * 3
    specials = [t for t in ids if t >= tok.eos_token_id]
    assert specials, f"premise: the greedy completion of {prompt_token_ids} has no special token: {ids}"
    assert results[False].text == tok.decode(ids, skip_special_tokens=False)
    assert results[True].text == results[None].text == tok.decode(ids, skip_special_tokens=True)
    for t in specials:
        name = tok.decode([t])  # e.g. "<|extra_56|>"
        assert name.startswith("<|") and name in results[False].text and name not in results[True].text
    # The same ids as the offline engine for the same request (the server's defaults spelled out).
    request_id = f"special-{prompt_token_ids[0]}"
    offline_engine.add_request(request_id, prompt_token_ids=prompt_token_ids,
                               params=offline_engine.default_params(max_tokens=6, **GREEDY))
    while offline_engine.has_unfinished_requests():
        final = [out for out in offline_engine.step() if out.finished]
    assert final[0].request_id == request_id and final[0].outputs[0].token_ids == ids
