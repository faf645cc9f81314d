"""Soak test of a qwenserve gRPC server: many concurrent streams of mixed, partly hostile traffic
for a long time, then the figures that say whether the server stayed healthy.

    python benchmarks/soak.py [--duration 600] [--streams 200] [--seed 0] [--json PATH]
        [--address HOST:PORT [--server-pid PID]]     # an existing server (PID: for its RSS)
        [--server-args "..."]                        # else: a server it starts (built-in model, CPU)

Each of --streams workers sends one request after another until --duration is over:
  normal (65%)      prompt or chat, max_tokens 4-48 (--max-tokens), greedy or sampled, n = 2 or 3 for a fifth,
                    stop strings, logprobs, seeds, min_tokens; the stream is checked (each
                    completion ends once, one logprobs entry per token, every logprob finite);
  cancel (10%)      cancelled by the client 0-500 ms after it starts;
  deadline (10%)    a deadline of 50-500 ms;
  hostile (15%)     one of HOSTILE: over a size limit, not UTF-8, cut short, values that could
                    make NaN, ids outside the vocabulary, ... each must get INVALID_ARGUMENT.
Meanwhile health is checked and the server's RSS (its process and every process below it: the
engine core, workers) read every second, and the longest time any
open call went without a message is tracked.

Figures (printed, returned by `run_soak`, written by --json): requests by kind and outcome,
unexpected outcomes (any status a kind must not get: UNAVAILABLE means the engine died), the
longest silence of a stream, health checks that were not SERVING, the server's RSS (peak in the
first half, peak, end; growth = end - first-half peak), tokens streamed, and whether every KV
block was free once the traffic stopped. tests/test_soak.py runs this for 30 s with 64 streams in CI.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from qwenserve.server import qwenserve_pb2 as pb  # noqa: E402
from qwenserve.server.client import AsyncQwenClient  # noqa: E402

DEFAULT_SERVER_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "512",
                        "--kv-cache-memory", "96MiB", "--seed", "0"]
# The deadline of every call that has no short one: only there to make sure the run ends (a call
# still open after it is an unexpected DEADLINE_EXCEEDED); a stuck stream shows in max_silence_s.
CALL_TIMEOUT_S = 600.0
WORDS = ("the capital of Iceland is Reykjavik and its harbour is cold in winter but the people "
         "are warm 冰岛的首都是雷克雅未克 蒙古国的首都是乌兰巴托 once upon a time there was a small "
         "model that served many streams at once").split()
STOPS = [" the", ".", "\n", "a", "是", " is"]


def _raw(*fields: tuple) -> bytes:
    """A hand-built message: (field number, payload bytes) pairs, length-delimited."""
    out = b""
    for number, payload in fields:
        out += bytes([number << 3 | 2, len(payload)]) + payload
    return out


def _message(request: pb.GenerateRequest) -> bytes:
    return request.SerializeToString()


# name -> request bytes; every one must be answered INVALID_ARGUMENT (for max_model_len 512).
HOSTILE = {
    "request_id over its limit": _message(pb.GenerateRequest(request_id="r" * 300, prompt="hi")),
    "17 stop strings": _message(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(stop=["s"] * 17))),
    "a 600-character stop string": _message(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(
        stop=["s" * 600]))),
    "prompt over its character limit": _message(pb.GenerateRequest(prompt="a" * 70_000)),
    "too many chat messages": _message(pb.GenerateRequest(chat=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="a")] * 200))),
    "prompt over max_model_len": _message(pb.GenerateRequest(prompt="hello " * 600)),
    "prompt not UTF-8": _raw((2, b"hi \xff\xfe")),
    "chat content not UTF-8": _raw((4, _raw((1, _raw((1, b"user"), (2, b"\xed\xa0\x80")))))),
    "message cut short": _message(pb.GenerateRequest(prompt="a complete prompt"))[:7],
    "repetition_penalty 1e-45": _message(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(
        repetition_penalty=1e-45))),
    "stop id outside the vocabulary": _message(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(
        stop_token_ids=[2 ** 32 - 1]))),
    "prompt id outside the vocabulary": _message(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[151851]))),
    "empty prompt": _message(pb.GenerateRequest(prompt="")),
    "n = 0": _message(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(n=0))),
    "unknown chat role": _message(pb.GenerateRequest(chat=pb.ChatMessages(
        messages=[pb.ChatMessage(role="robot", content="hi")]))),
}
# Outcomes each kind may have; anything else is unexpected.
EXPECTED = {"normal": {"OK"}, "cancel": {"OK", "CANCELLED"}, "deadline": {"OK", "DEADLINE_EXCEEDED"},
            "hostile": {"INVALID_ARGUMENT"}}
KINDS = (("normal", 0.65), ("cancel", 0.10), ("deadline", 0.10), ("hostile", 0.15))


@dataclass
class SoakFigures:
    duration_s: float
    streams: int
    requests: dict = field(default_factory=dict)        # kind -> count
    outcomes: dict = field(default_factory=dict)        # "kind OUTCOME" -> count
    unexpected: int = 0
    unexpected_examples: list = field(default_factory=list)
    max_silence_s: float = 0.0                          # longest an open call went without a message:
    max_first_message_s: float = 0.0                    # from a call's start to its first message (queueing)
    max_gap_s: float = 0.0                              # between two messages of a call (a stall mid-stream)
    health_checks: int = 0
    health_not_serving: int = 0
    tokens_streamed: int = 0
    tokens_per_s: float = 0.0
    seconds_per_step: Optional[float] = None            # the engine's mean step time under this load
    # The server's RSS: its highest in the first half of the traffic (the working set, once the
    # largest batches and every kind of request have been seen), its highest overall, at the end
    # (all blocks free); growth = end - first-half peak: a leak shows as an end above it.
    rss_first_half_peak_mib: Optional[float] = None
    rss_peak_mib: Optional[float] = None
    rss_end_mib: Optional[float] = None
    rss_growth_mib: Optional[float] = None
    blocks_free_at_end: bool = False
    idle_after_s: Optional[float] = None                # from the last call's end to all blocks free
    final_stats: dict = field(default_factory=dict)
    load_average: tuple = ()                            # the machine's 1/5/15-minute load at the end


def process_tree(pid: int) -> list[int]:
    """`pid` and every living process below it (from /proc's children lists)."""
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in found:
                    found.append(kid)
                    todo.append(kid)
    return found


def _process_rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return None


def rss_mib(pid: int) -> Optional[float]:
    """The RSS of the server: the process `pid` and all its descendants summed (the front end,
    the engine-core process, tensor-parallel workers), so that a leak in any of them shows.
    None when `pid` itself is gone."""
    own = _process_rss_kib(pid)
    if own is None:
        return None
    return (own + sum(_process_rss_kib(kid) or 0 for kid in process_tree(pid)[1:])) / 1024


class _Soak:
    def __init__(self, address: str, server_pid: Optional[int], streams: int, duration: float, seed: int,
                 max_tokens: int):
        self.address, self.server_pid = address, server_pid
        self.streams, self.duration, self.max_tokens = streams, duration, max_tokens
        self.rng = random.Random(seed)
        self.figures = SoakFigures(duration_s=duration, streams=streams)
        self.open_calls: dict[int, float] = {}  # call number -> time of its last message (or start)
        self.heard_from: set = set()  # open calls that have had a message
        self.calls = 0
        self.requests: collections.Counter = collections.Counter()
        self.outcomes: collections.Counter = collections.Counter()
        self.rss_samples: list[tuple[float, float]] = []

    # ---------------------------------------------------------------- one call
    def _heard(self, call: int, message: bool = True) -> None:
        now = time.monotonic()
        silence = now - self.open_calls[call]
        f = self.figures
        f.max_silence_s = max(f.max_silence_s, silence)
        if message and call in self.heard_from:
            f.max_gap_s = max(f.max_gap_s, silence)
        elif message:
            f.max_first_message_s = max(f.max_first_message_s, silence)
            self.heard_from.add(call)
        self.open_calls[call] = now

    def _normal_request(self, rng: random.Random) -> dict:
        words = rng.sample(WORDS, rng.randint(3, 25))
        options = dict(max_tokens=rng.randint(4, self.max_tokens), temperature=rng.choice([0.0, 0.7, 1.0]),
                       top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]),
                       ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.2:
            options.update(n=rng.choice([2, 3]), temperature=1.0)
        if rng.random() < 0.25:
            options["stop"] = rng.sample(STOPS, rng.randint(1, 3))
        if rng.random() < 0.25:
            options["logprobs"] = rng.randint(0, 5)
        if rng.random() < 0.5:
            options["seed"] = rng.randrange(2 ** 32)
        if rng.random() < 0.1:
            options["min_tokens"] = rng.randint(1, options["max_tokens"])
        if rng.random() < 0.2:
            return dict(messages=[{"role": "user", "content": " ".join(words)}], system="Be brief.", **options)
        return dict(prompt=" ".join(words), **options)

    async def _consume(self, call: int, stream, check: Optional[dict]) -> None:
        ended: set = set()
        async for delta in stream:
            self._heard(call)
            self.figures.tokens_streamed += len(delta.token_ids)
            if check is None:
                continue
            if delta.index in ended or delta.index >= check["n"]:
                raise AssertionError(f"a message for completion {delta.index} after its end")
            if check["logprobs"] is not None and len(delta.logprobs) != len(delta.token_ids):
                raise AssertionError("not one logprobs entry per token")
            if any(not math.isfinite(lp) for entry in delta.logprobs for _, lp in entry):
                raise AssertionError("a logprob that is not finite")
            if delta.finish_reason:
                if delta.finish_reason not in ("stop", "length"):
                    raise AssertionError(f"finish_reason {delta.finish_reason!r}")
                ended.add(delta.index)
        if check is not None and len(ended) != check["n"]:
            raise AssertionError(f"{check['n'] - len(ended)} completion(s) never ended")

    async def _one_call(self, client: AsyncQwenClient, raw_generate, kind: str, rng: random.Random) -> str:
        call = self.calls = self.calls + 1
        self.open_calls[call] = time.monotonic()
        try:
            if kind == "hostile":
                name = rng.choice(sorted(HOSTILE))
                stream = raw_generate(HOSTILE[name], timeout=CALL_TIMEOUT_S)
                async for _ in stream:
                    self._heard(call)
                return "OK"
            request = self._normal_request(rng)
            check = {"n": request.get("n", 1), "logprobs": request.get("logprobs")} if kind == "normal" else None
            timeout = rng.uniform(0.05, 0.5) if kind == "deadline" else CALL_TIMEOUT_S
            consume = self._consume(call, client.generate_stream(timeout=timeout, **request), check)
            if kind == "cancel":
                try:
                    await asyncio.wait_for(consume, rng.uniform(0.0, 0.5))  # cancels the call on expiry
                except asyncio.TimeoutError:
                    return "CANCELLED"
            else:
                await consume
            return "OK"
        except grpc.RpcError as e:
            if e.code().name not in EXPECTED[kind] and len(self.figures.unexpected_examples) < 20:
                self.figures.unexpected_examples.append(f"{kind}: {e.code().name}: {e.details()}")
            return e.code().name
        except AssertionError as e:
            self.figures.unexpected_examples.append(f"{kind}: bad stream: {e}")
            return "BAD_STREAM"
        finally:
            self._heard(call, message=False)
            del self.open_calls[call]
            self.heard_from.discard(call)

    async def _worker(self, client: AsyncQwenClient, raw_generate, rng: random.Random, stop_at: float) -> None:
        kinds, weights = zip(*KINDS)
        while time.monotonic() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            self.requests[kind] += 1
            outcome = await self._one_call(client, raw_generate, kind, rng)
            self.outcomes[f"{kind} {outcome}"] += 1
            if outcome not in EXPECTED[kind]:
                self.figures.unexpected += 1

    # ---------------------------------------------------------------- monitors
    async def _monitor(self, health, started: float) -> None:
        while True:
            now = time.monotonic()
            for last in list(self.open_calls.values()):  # calls still open count too
                self.figures.max_silence_s = max(self.figures.max_silence_s, now - last)
            if self.server_pid is not None:
                rss = rss_mib(self.server_pid)
                if rss is not None:
                    self.rss_samples.append((now - started, rss))
            self.figures.health_checks += 1
            try:
                status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status
                ok = status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                ok = False
            self.figures.health_not_serving += not ok
            await asyncio.sleep(1.0)

    async def _wait_idle(self, client: AsyncQwenClient, limit_s: float = 60.0) -> None:
        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            stats = await client.stats(timeout=10)
            if all(stats[k] == 0 for k in ("num_used_blocks", "num_running", "num_waiting", "num_pending",
                                           "num_active_requests")):
                self.figures.blocks_free_at_end = True
                self.figures.idle_after_s = round(time.monotonic() - started, 2)
                self.figures.final_stats = stats
                return
            await asyncio.sleep(0.1)
        self.figures.final_stats = await client.stats(timeout=10)

    # ---------------------------------------------------------------- the run
    async def run(self) -> SoakFigures:
        started = time.monotonic()
        stop_at = started + self.duration
        # Several connections, as several clients would open (50 streams each).
        clients = [AsyncQwenClient(self.address) for _ in range(max(1, math.ceil(self.streams / 50)))]
        raw = [c.channel.unary_stream("/qwenserve.v1.Generation/Generate", request_serializer=None,
                                      response_deserializer=pb.GenerateResponse.FromString) for c in clients]
        health = health_pb2_grpc.HealthStub(clients[0].channel)
        monitor = asyncio.ensure_future(self._monitor(health, started))
        try:
            await asyncio.gather(*(self._worker(clients[i % len(clients)], raw[i % len(clients)],
                                                random.Random(self.rng.random()), stop_at)
                                   for i in range(self.streams)))
            traffic_s = time.monotonic() - started
            await self._wait_idle(clients[0])
        finally:
            monitor.cancel()
            for c in clients:
                await c.close()
        f = self.figures
        f.requests, f.outcomes = dict(self.requests), dict(sorted(self.outcomes.items()))
        f.tokens_per_s = round(f.tokens_streamed / traffic_s, 1)
        if f.final_stats.get("num_steps"):
            f.seconds_per_step = round(traffic_s / f.final_stats["num_steps"], 3)
        f.max_silence_s, f.max_first_message_s, f.max_gap_s = (
            round(f.max_silence_s, 2), round(f.max_first_message_s, 2), round(f.max_gap_s, 2))
        if self.rss_samples:
            first_half = [rss for t, rss in self.rss_samples if t <= self.duration / 2] or [self.rss_samples[0][1]]
            f.rss_first_half_peak_mib = round(max(first_half), 1)
            f.rss_peak_mib = round(max(rss for _, rss in self.rss_samples), 1)
            f.rss_end_mib = round(rss_mib(self.server_pid) or self.rss_samples[-1][1], 1)
            f.rss_growth_mib = round(f.rss_end_mib - f.rss_first_half_peak_mib, 1)
        f.load_average = tuple(round(x, 2) for x in os.getloadavg())
        return f


def run_soak(address: str, server_pid: Optional[int] = None, streams: int = 200, duration: float = 600.0,
             seed: int = 0, max_tokens: int = 48) -> SoakFigures:
    """Runs the soak against the server at `address` (its RSS is read when `server_pid` is given);
    normal requests ask for 4 to `max_tokens` tokens."""
    return asyncio.run(_Soak(address, server_pid, streams, duration, seed, max_tokens).run())


def print_figures(f: SoakFigures) -> None:
    print(f"soak: {f.streams} streams for {f.duration_s:g}s, {sum(f.requests.values())} requests "
          f"({', '.join(f'{k} {v}' for k, v in f.requests.items())})")
    for outcome, count in f.outcomes.items():
        print(f"  {outcome:<32} {count}")
    print(f"unexpected outcomes: {f.unexpected}")
    for example in f.unexpected_examples:
        print(f"  {example}")
    print(f"longest silence of a stream: {f.max_silence_s:.2f}s (waiting for the first message: "
          f"{f.max_first_message_s:.2f}s; between two messages: {f.max_gap_s:.2f}s)")
    print(f"health: {f.health_checks} checks, {f.health_not_serving} not SERVING")
    print(f"tokens streamed: {f.tokens_streamed} ({f.tokens_per_s} tok/s; {f.seconds_per_step} s per engine step)")
    if f.rss_end_mib is not None:
        print(f"server RSS: peak {f.rss_first_half_peak_mib} MiB in the first half, {f.rss_peak_mib} MiB overall, "
              f"{f.rss_end_mib} MiB at the end (growth {f.rss_growth_mib:+} MiB)")
    print(f"every KV block free at the end: {'yes' if f.blocks_free_at_end else 'NO'}"
          + (f" ({f.idle_after_s}s after the traffic)" if f.idle_after_s is not None else ""))
    print(f"load average at the end: {' '.join(map(str, f.load_average))} on {os.cpu_count()} cores")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default: %(default)s)")
    p.add_argument("--streams", type=int, default=200, help="concurrent streams (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=48, help="most tokens a normal request asks for")
    p.add_argument("--address", default=None, help="an existing server; default: start one")
    p.add_argument("--server-pid", type=int, default=None, help="the existing server's pid, for its RSS")
    p.add_argument("--server-args", default=None,
                   help=f"flags for the server it starts (default: {' '.join(DEFAULT_SERVER_FLAGS)})")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    from benchmarks.run import ServerProcess

    server = None
    if args.address is None:
        flags = shlex.split(args.server_args) if args.server_args else DEFAULT_SERVER_FLAGS
        server = ServerProcess(flags, timeout=600)
    try:
        figures = run_soak(args.address or server.address, args.server_pid or (server and server.proc.pid),
                           args.streams, args.duration, args.seed, args.max_tokens)
    finally:
        if server is not None:
            server.stop()
    print_figures(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(figures), f, indent=2)
    healthy = figures.unexpected == 0 and figures.health_not_serving == 0 and figures.blocks_free_at_end
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
