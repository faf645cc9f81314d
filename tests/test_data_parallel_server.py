"""`qwenserve launch --dp N` end to end (CPU, built-in model, Ray): the same greedy tokens as
dp = 1 over gRPC and HTTP, each replica serving, metrics and GetStats per replica, a local
cluster on loopback only, and one replica's process killed under load while the other keeps
serving; with --tp 2 each replica's ranks live in its placement group (gloo), and a killed
front end takes every replica with it.

Ray is slow to start here: one server per module serves every test but the tp = 2 one, and the
replica-killing test runs last on it.
"""
import concurrent.futures
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from qwenserve.sampling_params import SamplingParams
from qwenserve.server.client import QwenClient

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--device", "cpu", "--max-model-len", "256", "--kv-cache-memory", "16MiB", "--seed", "0"]
# Prompts of several blocks (16 tokens each) and a few shorter ones.
PROMPTS = ["The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
           "蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是", "Once upon a time", "a b c", "Hello, my name is",
           "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "The quick brown fox"]
MAX_TOKENS = 10
GREEDY = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def descendants(pid: int) -> set[int]:
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


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout:g} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


class DPServer:
    def __init__(self, tmp_path: Path, *flags: str):
        self.log_path = tmp_path / "server.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "qwenserve.cli", "launch", "--port", "0", "--http-port", "0",
                 *FLAGS, *flags], stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ready on" in line:
                break
        ready = next((line for line in self.lines if "ready on" in line), None)
        assert ready is not None, self.log()
        self.address = ready.split(" on ")[1].split()[0]
        self.http_url = re.search(r"https?://\S+", ready).group(0)

    def core_pids(self) -> list[int]:
        return sorted(p for p in descendants(self.proc.pid) if "EngineCoreActor" in cmdline(p))

    def log(self) -> str:
        return "".join(self.lines) + "\n--- stderr ---\n" + self.log_path.read_text()[-6000:]

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def metrics(self) -> dict:
        text = httpx.get(self.http_url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(90)


@pytest.fixture(scope="module")
def dp1_tokens(tiny_checkpoint):
    from qwenserve import LLM

    llm = LLM(device="cpu", dtype="float32", max_model_len=256, kv_cache_memory=16 * 1024 ** 2, seed=0)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
        return {p: o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)}
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    server = DPServer(tmp_path_factory.mktemp("dp2"), "--dp", "2")
    before = descendants(server.proc.pid)
    yield server
    assert server.stop() == 0, server.log()
    # The replicas and the local Ray cluster go with the server.
    wait_until(lambda: not any(alive(p) for p in before), 30,
               f"Ray processes left: {[cmdline(p)[:80] for p in before if alive(p)]}")


@pytest.mark.timeout(600)
def test_dp2_gives_dp1_greedy_tokens_over_grpc_and_http(dp2, dp1_tokens):
    def over_grpc(prompt):
        with QwenClient(dp2.address) as client:
            return client.generate(prompt, **GREEDY).token_ids

    def over_http(prompt):
        reply = httpx.post(dp2.http_url + "/v1/completions", timeout=120, json=dict(
            model="qwen-tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
            logprobs=0))
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        return choice["logprobs"]["tokens"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:   # concurrent: both replicas get work
        grpc_tokens = list(pool.map(over_grpc, PROMPTS))
        http_texts = list(pool.map(over_http, PROMPTS))
    assert grpc_tokens == [dp1_tokens[p] for p in PROMPTS]
    # HTTP reports each token's text: the same ids decode to the same pieces.
    from qwenserve.model.checkpoint import builtin_model_dir
    from qwenserve.model.tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.from_dir(builtin_model_dir())
    assert ["".join(t) for t in http_texts] == [tokenizer.decode(dp1_tokens[p]) for p in PROMPTS]
    with QwenClient(dp2.address) as client:
        info, stats = client.model_info(), client.stats()
    assert info["data_parallel_size"] == 2
    routed = [r["num_routed_requests"] for r in stats["replicas"]]
    assert all(n > 0 for n in routed) and sum(routed) >= 2 * len(PROMPTS), stats["replicas"]
    assert stats["num_total_blocks"] == sum(r["num_total_blocks"] for r in stats["replicas"]) > 0
    metrics = dp2.metrics()
    for replica in ("0", "1"):
        assert metrics[("qwenserve:engine_core_up", (("replica", replica),))] == 1
        assert metrics[("qwenserve:prefix_cache_queries_total", (("replica", replica),))] > 0


def listening_addresses(pids: set[int]) -> set[str]:
    """The local IPs the processes' listening TCP sockets are bound to."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                # The kernel prints the address as 32-bit words in host (little-endian) order.
                raw = b"".join(bytes.fromhex(local.split(":")[0][i:i + 8])[::-1]
                               for i in range(0, len(local.split(":")[0]), 8))
                address = ipaddress.ip_address(raw)
                found.add(str(getattr(address, "ipv4_mapped", None) or address))
    return found


def test_a_loopback_servers_local_cluster_listens_on_loopback_only(dp2):
    """--host 127.0.0.1: Ray's processes and the replicas' sockets take no address but 127.0.0.1."""
    below = descendants(dp2.proc.pid)
    assert any("raylet" in cmdline(p) for p in below) and len(dp2.core_pids()) == 2
    addresses = listening_addresses(below)
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses


@pytest.mark.timeout(600)
def test_killing_a_replica_under_load_leaves_the_other_serving(dp2, dp1_tokens):
    """Last on this server. Eight streams in flight on two replicas; one replica's process is
    killed: its streams end UNAVAILABLE within 5 s, the others finish with dp = 1's tokens, health
    stays SERVING, the dead replica leaves routing (GetStats, /metrics) and new requests succeed."""
    long = dict(max_tokens=120, temperature=0.0, ignore_eos=True)
    victim = dp2.core_pids()[1]
    started = concurrent.futures.ThreadPoolExecutor(8)
    first_token = [concurrent.futures.Future() for _ in PROMPTS]

    def stream(i):
        tokens = []
        with QwenClient(dp2.address) as client:
            try:
                for delta in client.generate_stream(PROMPTS[i], **long):
                    tokens += delta.token_ids
                    if not first_token[i].done():
                        first_token[i].set_result(time.monotonic())
            except grpc.RpcError as e:
                return tokens, e, time.monotonic()
        return tokens, None, time.monotonic()

    futures = [started.submit(stream, i) for i in range(len(PROMPTS))]
    concurrent.futures.wait(first_token, timeout=120)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    results = [f.result(timeout=300) for f in futures]
    started.shutdown()
    failed = [(tokens, error, end) for tokens, error, end in results if error is not None]
    finished = [(i, tokens) for i, (tokens, error, _) in enumerate(results) if error is None]
    assert failed and finished, results
    for tokens, error, end in failed:
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "replica" in error.details(), error.details()
        assert end - killed < 5
    for i, tokens in finished:
        assert len(tokens) == 120 and tokens[:MAX_TOKENS] == dp1_tokens[PROMPTS[i]]
    assert dp2.health() == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(dp2.http_url + "/health").status_code == 200
    with QwenClient(dp2.address) as client:
        replicas = client.stats()["replicas"]
        assert sorted(r["alive"] for r in replicas) == [False, True]
        dead = next(r["replica"] for r in replicas if not r["alive"])
        routed_before = [r["num_routed_requests"] for r in replicas]
        for prompt in PROMPTS[:4]:
            assert client.generate(prompt, **GREEDY).token_ids == dp1_tokens[prompt]
        routed_after = [r["num_routed_requests"] for r in client.stats()["replicas"]]
    assert routed_after[dead] == routed_before[dead]                 # never routed to again
    assert sum(routed_after) == sum(routed_before) + 4
    assert dp2.metrics()[("qwenserve:engine_core_up", (("replica", str(dead)),))] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags, message", [
    (["--kv-cache-memory", "1KiB"], "fewer than 2 blocks"),     # every core refuses it, as at dp = 1
    (["--device", "cuda"], "device: data_parallel_size 2 x tensor_parallel_size 1 on CUDA needs 2 GPUs"),
])
def test_a_bad_setting_fails_the_start_cleanly(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "qwenserve.cli", "launch", "--port", "0", "--http-port", "0",
                           *FLAGS, "--dp", "2", *flags], capture_output=True, text=True, cwd=REPO, timeout=240,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(900)
def test_dp2_tp2_ranks_in_each_replicas_group_and_a_killed_front_end_takes_all(tmp_path, dp1_tokens):
    """--dp 2 --tp 2: two cores, each driving two gloo ranks in its own placement group; the
    tokens are dp = 1's; SIGKILL on the server: the cores (watching the front end's pid) stop
    and their ranks with them within seconds; Ray's own agents, whose raylet died with the
    server, leave by themselves about a minute later."""
    server = DPServer(tmp_path, "--dp", "2", "--tp", "2")
    ours: list[int] = []
    try:
        below = descendants(server.proc.pid)
        ranks = [p for p in below if "RankWorker" in cmdline(p)]
        ours = ranks + server.core_pids()
        assert len(ranks) == 4 and len(ours) == 6, [cmdline(p)[:80] for p in below]
        with concurrent.futures.ThreadPoolExecutor(4) as pool, QwenClient(server.address) as client:
            tokens = list(pool.map(lambda p: client.generate(p, **GREEDY).token_ids, PROMPTS[:4]))
            routed = [r["num_routed_requests"] for r in client.stats()["replicas"]]
        assert tokens == [dp1_tokens[p] for p in PROMPTS[:4]]
        assert all(n > 0 for n in routed), routed
    finally:
        below = set(ours) | descendants(server.proc.pid)
        server.proc.kill()
        server.proc.wait(30)
    wait_until(lambda: not any(alive(p) for p in ours), 15,
               f"replicas left behind: {[cmdline(p)[:80] for p in ours if alive(p)]}")
    wait_until(lambda: not any(alive(p) for p in below), 150,
               f"Ray processes left behind: {[cmdline(p)[:80] for p in below if alive(p)]}")
