"""Unit tests of `qwenserve.server.engine_bridge` against a scripted stand-in engine.

The bridge's contract (deltas, bounded queue, abort, engine failure, no busy spinning) is
checked here without a model; tests/test_server.py checks the whole server end to end.
"""
import queue
import threading
import time
from types import SimpleNamespace

import pytest

from qwenserve.server.engine_bridge import (Delta, EngineBridge, EngineFailure, EngineUnavailable,
                                            QueueFull)


class ScriptedEngine:
    """Emits one token per step per running request: token ids 1, 2, 3, ... and text 'a'."""

    def __init__(self, max_running=8, fail_at_step=None):
        self.max_running = max_running
        self.fail_at_step = fail_at_step
        self.waiting, self.running = [], []
        self.steps = 0
        self.aborted = []
        self.has_unfinished_calls = 0

    def add_request(self, request_id, prompt=None, params=None, **_):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        self.waiting.append(SimpleNamespace(id=request_id, n=params["n"], max_tokens=params["max_tokens"],
                                            tokens=[[] for _ in range(params["n"])]))

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        self.waiting = [r for r in self.waiting if r.id != request_id]
        self.running = [r for r in self.running if r.id != request_id]

    def has_unfinished_requests(self):
        self.has_unfinished_calls += 1
        return bool(self.waiting or self.running)

    def step(self):
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("device lost")
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.pop(0))
        time.sleep(0.001)
        outputs = []
        for r in list(self.running):
            for toks in r.tokens:
                toks.append(len(toks) + 1)
            done = len(r.tokens[0]) >= r.max_tokens
            outputs.append(SimpleNamespace(
                request_id=r.id, prompt_token_ids=[7, 8, 9], finished=done,
                outputs=[SimpleNamespace(index=i, text="a" * len(t), token_ids=list(t),
                                         finish_reason="length" if done else None, logprobs=None)
                         for i, t in enumerate(r.tokens)]))
            if done:
                self.running.remove(r)
        return outputs

    def get_stats(self):
        # Like the real engine, whose scheduler queues each of a request's n completions.
        return {"num_used_blocks": len(self.running), "num_waiting": sum(r.n for r in self.waiting),
                "num_running": len(self.running)}


def collect(bridge, request_id, prompt="hi", n=1, max_tokens=3):
    items: queue.Queue = queue.Queue()
    future = bridge.add(request_id, items.put, n=n, prompt=prompt,
                        params={"n": n, "max_tokens": max_tokens})
    return future, items


def drain(items, n=1, timeout=5.0):
    """All deltas until each of the n completions finished (or the engine failed)."""
    deltas, finished = [], 0
    while finished < n:
        item = items.get(timeout=timeout)
        if isinstance(item, EngineFailure):
            return deltas, item
        deltas.extend(item)
        finished += sum(1 for d in item if d.finish_reason)
    return deltas, None


@pytest.fixture
def make_bridge():
    bridges = []

    def make(engine, max_waiting=16, on_failure=None):
        bridge = EngineBridge(engine, max_waiting, on_failure=on_failure)
        bridge.start()
        bridges.append(bridge)
        return bridge

    yield make
    for bridge in bridges:
        bridge.close(timeout=5)


def test_deltas_concatenate_per_completion(make_bridge):
    bridge = make_bridge(ScriptedEngine())
    future, items = collect(bridge, "r1", n=2, max_tokens=3)
    future.result(timeout=5)
    deltas, failure = drain(items, n=2)
    assert failure is None
    for i in range(2):
        mine = [d for d in deltas if d.index == i]
        assert [tuple(d.token_ids) for d in mine] == [(1,), (2,), (3,)]
        assert "".join(d.text for d in mine) == "aaa"
        assert [d.finish_reason for d in mine] == [None, None, "length"]
        assert mine[-1] == Delta(i, "a", (3,), "length", 3, 3, None)
    assert bridge.stats()["num_finished_requests"] == 1
    assert bridge.num_active == 0


def test_bad_input_fails_the_future_and_the_bridge_keeps_serving(make_bridge):
    bridge = make_bridge(ScriptedEngine())
    future, _ = collect(bridge, "bad", prompt="")
    with pytest.raises(ValueError, match="^prompt"):
        future.result(timeout=5)
    future, items = collect(bridge, "good")
    future.result(timeout=5)
    assert drain(items)[1] is None


def test_abort_ends_every_open_completion_with_abort(make_bridge):
    engine = ScriptedEngine()
    bridge = make_bridge(engine)
    future, items = collect(bridge, "long", n=2, max_tokens=10**9)
    future.result(timeout=5)
    items.get(timeout=5)
    bridge.abort("long")
    deltas, _ = drain(items, n=2)
    assert sorted(d.index for d in deltas if d.finish_reason == "abort") == [0, 1]
    assert engine.aborted == ["long"]
    assert bridge.num_active == 0


def test_waiting_queue_is_bounded(make_bridge):
    engine = ScriptedEngine(max_running=1)
    bridge = make_bridge(engine, max_waiting=1)
    running, _ = collect(bridge, "running", max_tokens=10**9)
    running.result(timeout=5)
    deadline = time.monotonic() + 5
    while bridge.stats()["num_running"] != 1:  # "running" left the waiting queue
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiting, _ = collect(bridge, "waiting", max_tokens=10**9)
    waiting.result(timeout=5)
    with pytest.raises(QueueFull, match="max_waiting_requests=1"):
        collect(bridge, "overflow")
    bridge.abort_all()


def test_each_of_n_completions_counts_toward_max_waiting_requests(make_bridge):
    """A request with n completions takes n places in the waiting queue: both while it is
    still in the bridge's inbox and once the engine queued it. One call with a huge n cannot
    slip past max_waiting_requests."""
    # Inbox only: an unstarted bridge leaves every add pending.
    pending = EngineBridge(ScriptedEngine(), max_waiting_requests=4)
    collect(pending, "three", n=3)
    with pytest.raises(QueueFull, match="max_waiting_requests=4"):
        collect(pending, "two", n=2)
    collect(pending, "one", n=1)
    assert pending.stats()["num_pending"] == 4
    with pytest.raises(QueueFull, match="max_waiting_requests=4"):
        collect(pending, "another")
    pending.close()

    # In the engine's waiting queue behind a running request.
    engine = ScriptedEngine(max_running=1)
    bridge = make_bridge(engine, max_waiting=4)
    collect(bridge, "running", max_tokens=10**9)[0].result(timeout=5)
    deadline = time.monotonic() + 5
    while bridge.stats()["num_running"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    collect(bridge, "three", n=3, max_tokens=10**9)[0].result(timeout=5)
    assert bridge.stats()["num_waiting"] == 3
    with pytest.raises(QueueFull, match="max_waiting_requests=4"):
        collect(bridge, "two", n=2)
    collect(bridge, "one", n=1, max_tokens=10**9)[0].result(timeout=5)
    with pytest.raises(QueueFull, match=r"^n=5 .*max_waiting_requests=4"):
        collect(bridge, "huge", n=5)  # could never fit: says so
    assert len(engine.waiting) == 2
    bridge.abort_all()


def test_duplicate_request_id_is_rejected(make_bridge):
    bridge = make_bridge(ScriptedEngine())
    collect(bridge, "same", max_tokens=10**9)[0].result(timeout=5)
    with pytest.raises(ValueError, match="^request_id"):
        collect(bridge, "same")
    bridge.abort_all()


def test_engine_failure_reaches_running_requests_and_refuses_new_ones(make_bridge):
    failed = threading.Event()
    bridge = make_bridge(ScriptedEngine(fail_at_step=3), on_failure=lambda reason: failed.set())
    future, items = collect(bridge, "victim", max_tokens=10**9)
    future.result(timeout=5)
    _, failure = drain(items)
    assert isinstance(failure, EngineFailure) and "device lost" in failure.message
    assert failed.wait(5)
    with pytest.raises(EngineUnavailable, match="device lost"):
        collect(bridge, "late")


def test_stop_accepting_refuses_new_requests(make_bridge):
    bridge = make_bridge(ScriptedEngine())
    bridge.stop_accepting()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        collect(bridge, "late")


def test_idle_engine_thread_blocks_instead_of_spinning(make_bridge):
    engine = ScriptedEngine()
    bridge = make_bridge(engine)
    future, items = collect(bridge, "r", max_tokens=2)
    future.result(timeout=5)
    drain(items)
    time.sleep(0.05)
    calls, steps = engine.has_unfinished_calls, engine.steps
    time.sleep(0.3)
    assert (engine.has_unfinished_calls, engine.steps) == (calls, steps)


def test_a_future_cancelled_before_the_engine_takes_the_add_never_harms_the_engine(make_bridge):
    """A client cancel or deadline cancels the task awaiting `add`'s future (asyncio.wrap_future
    passes the cancel on). Whenever that happens relative to the engine thread applying the add,
    the engine thread must not fail (it used to set a result on the cancelled future, raising
    InvalidStateError and killing the engine for every later call)."""
    engine = ScriptedEngine()
    bridge = EngineBridge(engine, max_waiting_requests=16)  # not started: the add stays queued
    future, items = collect(bridge, "cancelled", max_tokens=10**9)
    assert future.cancel()
    bridge.start()
    try:
        after, after_items = collect(bridge, "after", max_tokens=2)
        after.result(timeout=5)
        deltas, failure = drain(after_items)
        assert failure is None and deltas[-1].finish_reason == "length"
        assert bridge.dead_reason is None
        assert [r.id for r in engine.running + engine.waiting] == []  # the cancelled add never ran
        assert bridge.num_active == 0
    finally:
        bridge.close(timeout=5)


def test_cancelling_futures_at_random_moments_never_kills_the_engine(make_bridge):
    """The same race, exercised many times with the engine thread running."""
    engine = ScriptedEngine(max_running=64)
    bridge = make_bridge(engine, max_waiting=1000)
    for i in range(300):
        future, _ = collect(bridge, f"r{i}", max_tokens=3)
        if i % 2:
            future.cancel()
        else:
            bridge.abort(f"r{i}")
    ok, items = collect(bridge, "last", max_tokens=2)
    ok.result(timeout=5)
    assert drain(items)[1] is None
    assert bridge.dead_reason is None
    deadline = time.monotonic() + 5
    while bridge.num_active:
        assert time.monotonic() < deadline, bridge.num_active
        time.sleep(0.01)


def test_step_observer_and_queue_time_reach_the_front_end(make_bridge):
    """The bridge reports each step's token count to `on_step` (an observer that raises is
    logged, never fatal) and passes the engine's queue time on every delta."""
    class TimedEngine(ScriptedEngine):
        def step(self):
            outputs = super().step()
            self.num_tokens_last_step = len(outputs)
            for out in outputs:
                out.queue_time = 0.25
            return outputs

    seen = []

    def observe(num_tokens):
        seen.append(num_tokens)
        raise RuntimeError("a buggy observer")

    bridge = EngineBridge(TimedEngine(), 16, on_step=observe)
    bridge.start()
    try:
        future, items = collect(bridge, "r", n=1, max_tokens=3)
        future.result(timeout=5)
        deltas, failure = drain(items)
        assert failure is None and [d.queue_time for d in deltas] == [0.25] * 3
        assert seen == [1, 1, 1] and bridge.dead_reason is None
    finally:
        bridge.close(timeout=5)
