"""The engine core in its own process: front ends sharing it, its idle loop, and deaths on
either side (the core's: every call ends UNAVAILABLE, health turns NOT_SERVING within 5 s;
the front end's: the core and its Ray workers exit, no orphans).

Tiny built-in model on the CPU; the servers are `qwenserve launch` subprocesses.
"""
import asyncio
import os
import re
import signal
import subprocess
import threading
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenserve.config import EngineConfig
from qwenserve.frontend.async_llm import AsyncLLM
from qwenserve.frontend.engine_client import Delta, EngineUnavailable, merge_deltas
from qwenserve.sampling_params import SamplingParams
from qwenserve.server.client import QwenClient

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(device="cpu", dtype="float32", max_model_len=256, kv_cache_memory=32 * 1024 ** 2, seed=0)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "1 2 3 4 5", "蒙古国的首都是", "Once upon a time"]


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` (from /proc's children lists)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wait_until(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout:g} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def offline_texts():
    from qwenserve import LLM

    llm = LLM(**CONFIG)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


async def _tokens(llm: AsyncLLM, request_id: str, prompt: str) -> list[int]:
    tokens = []
    async for deltas in llm.generate(request_id, params=GREEDY, prompt=prompt):
        for delta in deltas:
            tokens += delta.token_ids
    return tokens


def test_two_front_ends_share_one_core_each_with_its_own_outputs(offline_texts):
    """A second front end attaches to a running core; both stream at once, even under the same
    request ids, and each gets exactly its own requests' tokens (the offline engine's); the
    second one leaving does not stop the core."""
    async def run():
        first = await AsyncLLM(EngineConfig(**CONFIG)).start("WARNING")
        second = await AsyncLLM.attach(first.core_client.input_address, client_index=1)
        try:
            both = await asyncio.gather(*[_tokens(llm, f"same-{i}", p) for llm in (first, second)
                                          for i, p in enumerate(PROMPTS)])
            assert both[:len(PROMPTS)] == offline_texts
            assert both[len(PROMPTS):] == offline_texts
            assert second.info.num_kv_blocks == first.info.num_kv_blocks > 0
            await second.close()
            assert await _tokens(first, "after", PROMPTS[0]) == offline_texts[0]
            assert first.dead_reason is None
        finally:
            await first.close()

    asyncio.run(run())


def test_an_idle_core_blocks_instead_of_spinning():
    async def run():
        llm = await AsyncLLM(EngineConfig(**CONFIG)).start("WARNING")
        try:
            await _tokens(llm, "warm", PROMPTS[0])
            pid = llm.core_client.core_process.pid
            await asyncio.sleep(0.5)
            before = cpu_seconds(pid)
            await asyncio.sleep(3.0)
            # Waking up once a second for the workers' health check costs microseconds.
            assert cpu_seconds(pid) - before < 0.15
        finally:
            await llm.close()

    asyncio.run(run())


def test_a_killed_core_fails_every_call_at_once():
    """The core process is killed while a request streams and another waits to be processed:
    both end with EngineUnavailable naming the exit, the failure callback runs, and later
    calls are refused, all within 5 s."""
    async def run():
        llm = await AsyncLLM(EngineConfig(**CONFIG)).start("WARNING")
        failures = []
        llm.on_failure(failures.append)
        try:
            stream = llm.generate("long", params=SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                                  prompt="Tell me a long story")
            await stream.__anext__()
            killed = time.monotonic()
            os.kill(llm.core_client.core_process.pid, signal.SIGKILL)
            with pytest.raises(EngineUnavailable, match="exited unexpectedly"):
                async for _ in stream:
                    pass
            assert time.monotonic() - killed < 5
            assert failures and "exited unexpectedly" in failures[0]
            with pytest.raises(EngineUnavailable):
                await _tokens(llm, "later", PROMPTS[0])
        finally:
            await llm.close()

    asyncio.run(run())


class Server:
    def __init__(self, tmp_path: Path, *flags: str):
        self.log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "qwenserve.cli", "launch", "--port", "0", "--http-port", "0",
                 "--device", "cpu", "--max-model-len", "256", "--kv-cache-memory", "32MiB", *flags],
                stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ready on" in line:
                break
        assert any("ready on" in line for line in self.lines), self.log()
        ready = next(line for line in self.lines if "ready on" in line)
        self.address = ready.split(" on ")[1].split()[0]
        self.http_url = re.search(r"https?://\S+", ready).group(0)  # "... and http://HOST:PORT (HTTP)"
        (self.core_pid,) = [pid for pid in descendants(self.proc.pid)
                            if "qwenserve.engine_core.process" in Path(f"/proc/{pid}/cmdline").read_text()]

    def log(self) -> str:
        return "".join(self.lines) + "\n--- stderr ---\n" + self.log_path.read_text()[-4000:]

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.timeout(300)
def test_server_health_turns_not_serving_within_5_s_when_the_core_dies(tmp_path):
    server = Server(tmp_path)
    try:
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        with QwenClient(server.address) as client:
            stream = client.generate_stream("Tell me a long story", max_tokens=200, temperature=0.0, ignore_eos=True)
            next(stream)
            os.kill(server.core_pid, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                list(stream)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            took = wait_until(lambda: server.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
                              "health NOT_SERVING")
            assert took < 5
            with pytest.raises(grpc.RpcError) as later:
                client.generate("hi", max_tokens=2)
            assert later.value.code() == grpc.StatusCode.UNAVAILABLE
        assert httpx.get(server.http_url + "/health").status_code == 503
        assert server.proc.poll() is None  # the front end stays up for an orchestrator to see
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()


@pytest.mark.timeout(300)
def test_sigterm_stops_the_core_too(tmp_path):
    server = Server(tmp_path)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log()
    wait_until(lambda: not alive(server.core_pid), 10, "the core exits with the server")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [1, 2])
def test_a_killed_front_end_takes_the_core_and_its_workers_with_it(tmp_path, tp):
    """SIGKILL on the server (no chance to clean up): the core notices its parent is gone and
    stops its workers; with tp = 2 the Ray processes it started go too."""
    server = Server(tmp_path, "--tp", str(tp))
    below_core = descendants(server.core_pid)
    if tp > 1:
        assert below_core, "the core should have started Ray's processes"
    server.proc.kill()
    server.proc.wait(10)
    wait_until(lambda: not alive(server.core_pid), 15, "the core exits after its front end")
    wait_until(lambda: not any(alive(pid) for pid in below_core), 30,
               f"the core's workers exit: {[p for p in below_core if alive(p)]}")


@pytest.mark.timeout(600)
def test_a_rank_that_dies_while_idle_turns_health_not_serving_within_5_s(tmp_path):
    """tp = 2 and nothing running: the core's periodic health check of its workers notices a
    killed rank (no request needs to fail first)."""
    server = Server(tmp_path, "--tp", "2")
    try:
        ranks = [pid for pid in descendants(server.core_pid)
                 if "RankWorker" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
        assert len(ranks) == 2, [Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in descendants(server.core_pid)]
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        os.kill(ranks[1], signal.SIGKILL)
        took = wait_until(lambda: server.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
                          "health NOT_SERVING after a rank died")
        assert took < 5
        with QwenClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
            client.generate("hi", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "rank" in err.value.details()
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()


def test_input_processing_runs_off_the_event_loop_and_never_in_the_core():
    """Tokenizing a long prompt or chat must not stall other streams (issue 11, item 3): the
    front end tokenizes in a worker thread, never on its event loop; the core never tokenizes
    (it gets token ids only)."""
    from qwenserve.engine_core.core import EngineCore

    assert not any("token" in name.lower() and "izer" in name.lower() for name in vars(EngineCore))

    async def run():
        llm = await AsyncLLM(EngineConfig(**CONFIG)).start("WARNING")
        loop_thread = threading.get_ident()
        threads = []
        process = llm.input_processor.process

        def spying_process(*args, **kwargs):
            threads.append(threading.get_ident())
            return process(*args, **kwargs)

        llm.input_processor.process = spying_process
        try:
            await _tokens(llm, "text", "word " * 200)
            async for _ in llm.generate("chat", params=GREEDY, messages=[{"role": "user", "content": "hi " * 200}]):
                pass
            assert len(threads) == 2 and loop_thread not in threads
        finally:
            await llm.close()

    asyncio.run(run())


def test_merge_deltas_joins_each_completions_steps():
    steps = [Delta(0, "a", (1,), None, 5, 1, [[(1, -0.1)]], queue_time=0.25),
             Delta(1, "x", (7,), None, 5, 1, [[(7, -0.7)]], queue_time=0.25),
             Delta(0, "b", (2,), None, 5, 2, [[(2, -0.2)]]),
             Delta(1, "", (8,), "stop", 5, 2, [[(8, -0.8)]]),
             Delta(0, "c", (3,), "length", 5, 3, [[(3, -0.3)]])]
    assert merge_deltas(steps) == [
        Delta(0, "abc", (1, 2, 3), "length", 5, 3, [[(1, -0.1)], [(2, -0.2)], [(3, -0.3)]], queue_time=0.25),
        Delta(1, "x", (7, 8), "stop", 5, 2, [[(7, -0.7)], [(8, -0.8)]], queue_time=0.25)]
    assert merge_deltas(steps[:1]) == steps[:1]


def test_a_consumer_that_falls_behind_gets_the_waiting_steps_merged():
    """A consumer that sleeps between reads receives several steps per item, merged per
    completion: the same ids, text, logprobs and finish reasons as a consumer that keeps up."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, n=2, seed=3, logprobs=2)

    async def consume(llm, request_id, pause):
        items, ids, text, logprobs, finish, counts = 0, {}, {}, {}, {}, {}
        async for deltas in llm.generate(request_id, params=params, prompt=PROMPTS[0]):
            items += 1
            for d in deltas:
                ids.setdefault(d.index, []).extend(d.token_ids)
                text[d.index] = text.get(d.index, "") + d.text
                logprobs.setdefault(d.index, []).extend(d.logprobs or ())
                counts[d.index] = d.completion_tokens
                if d.finish_reason:
                    finish[d.index] = d.finish_reason
            await asyncio.sleep(pause)
        return items, ids, text, logprobs, finish, counts

    async def run():
        llm = await AsyncLLM(EngineConfig(**CONFIG)).start("WARNING")
        try:
            fast = await consume(llm, "fast", 0.0)
            slow = await consume(llm, "slow", 0.3)
        finally:
            await llm.close()
        return fast, slow

    fast, slow = asyncio.run(run())
    assert slow[0] < fast[0] / 2, (slow[0], fast[0])  # steps were merged
    assert slow[1:] == fast[1:]
    assert all(len(slow[1][i]) == len(slow[3][i]) == slow[5][i] == 24 for i in (0, 1))
    assert slow[4] == {0: "length", 1: "length"}


LAST_WORDS_CHILD = """
import os, sys
from qwenserve.config import EngineConfig
from qwenserve.engine_core import protocol as P
from qwenserve.engine_core.process import EngineCoreProc

core = EngineCoreProc(EngineConfig(device="cpu"), "unused", "ipc://" + sys.argv[1], "ipc://" + sys.argv[2],
                      parent_pid=None)
core._send(0, P.TAG_STARTUP_FAILED, P.EngineCoreStartupFailed("ValueError", "x" * int(sys.argv[3]), True))
core._close_output()
os._exit(1)  # as run_engine_core exits: at once, no atexit, zmq's I/O thread stopped where it is
"""


def test_the_last_message_before_the_core_exits_arrives_whole(tmp_path):
    """The core's last words (a startup failure, `engine_dead`) are followed at once by
    `os._exit`. A message of 64 MiB takes zmq's I/O thread many milliseconds to write, so unless
    `_close_output` waits for the write, the exit cuts it off and the front end could only say
    "exited unexpectedly". Here the front end reads every byte of it."""
    import msgspec
    import zmq

    from qwenserve.engine_core import protocol as P

    size = 64 * 1024 ** 2
    context = zmq.Context()
    output_socket = context.socket(zmq.PULL)
    output_socket.bind(f"ipc://{tmp_path}/out")
    try:
        child = subprocess.run([sys.executable, "-c", LAST_WORDS_CHILD, f"{tmp_path}/in", f"{tmp_path}/out", str(size)],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert child.returncode == 1, child.stderr
        assert output_socket.poll(5000), "the core exited and its last message never came"
        tag, body = output_socket.recv_multipart()
        assert tag == P.TAG_STARTUP_FAILED
        message = msgspec.msgpack.decode(body, type=P.EngineCoreStartupFailed)
        assert (message.error_type, len(message.message), message.bad_setting) == ("ValueError", size, True)
    finally:
        output_socket.close(linger=0)
        context.term()
