"""The bridge between gRPC calls and the `LLMEngine` step loop.

Owns the engine thread: the engine is not thread-safe, so exactly one thread (the one this
module starts) ever calls into it. gRPC handlers talk to it through a locked inbox of
add/abort operations and get their outputs back through a per-request *sink* (a callable
the engine thread calls with each step's deltas). Also owns:

- the bounded waiting queue: `add` raises `QueueFull` when the completions accepted but not
  yet running (the inbox's adds plus the engine's waiting queue; a request with n completions
  counts n, as the engine's scheduler queues each) would exceed `max_waiting_requests`;
- delta computation: the engine reports cumulative text/token ids per completion; the bridge
  turns them into what is new since the previous step, on the engine thread, so no other
  thread ever reads objects the engine may still mutate;
- failure: an exception from `engine.step()` marks the engine dead, hands `EngineFailure` to
  every live request and calls `on_failure` (the app turns health to NOT_SERVING); later
  adds raise `EngineUnavailable`;
- a stats snapshot refreshed by the engine thread, so `stats()` never races the engine.

When there is nothing to do the engine thread blocks on a condition: no busy spinning.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Sequence, Union

from qwenserve.frontend.engine_client import (Delta, EngineClient, EngineUnavailable, ModelInfo,
                                              QueueFull)
from qwenserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineFailure:
    """Handed to a request's sink when the engine died under it."""
    message: str


Sink = Callable[[Union[list, EngineFailure]], None]


class _Tracked:
    """The bridge's view of one request: where its outputs go and what was already sent."""

    def __init__(self, request_id: str, sink: Sink, n: int):
        self.request_id = request_id
        self.sink = sink
        self.n = n
        self.sent_text_len = [0] * n
        self.sent_num_tokens = [0] * n
        self.finished: set[int] = set()
        self.prompt_tokens = 0
        self.in_engine = False


class EngineBridge:
    def __init__(self, engine: Any, max_waiting_requests: int,
                 on_failure: Optional[Callable[[str], None]] = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_failure = on_failure
        self._cond = threading.Condition()
        # ("add", tracked, kwargs, future) | ("abort", request_id)
        self._inbox: collections.deque = collections.deque()
        self._num_pending_adds = 0  # completions (n per request) still in the inbox
        self._requests: dict[str, _Tracked] = {}  # every accepted, unfinished request
        self._has_work = False
        self._accepting = True
        self._closing = False
        self.dead_reason: Optional[str] = None
        self._num_finished = 0
        self._num_aborted = 0
        self._num_steps = 0
        self._engine_stats: dict = {}
        self._thread = threading.Thread(target=self._run, name="qwenserve-engine", daemon=True)

    # ---- called from any thread -------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            self._refresh_engine_stats()
        self._thread.start()

    def add(self, request_id: str, sink: Sink, n: int = 1,
            **add_kwargs) -> concurrent.futures.Future:
        """Queues `engine.add_request(request_id, **add_kwargs)`.

        Raises `QueueFull` when its n completions (each one waiting-queue entry) would take
        the waiting queue past `max_waiting_requests`.
        Returns a future that resolves to None once the engine accepted the request, or to
        the engine's exception (ValueError for bad input). From then on `sink` gets a list
        of `Delta` per step, until each of the n completions has sent its finish_reason.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self.dead_reason is not None:
                raise EngineUnavailable(f"engine failed: {self.dead_reason}")
            if not self._accepting:
                raise EngineUnavailable("server is shutting down")
            if request_id in self._requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            if n > self.max_waiting_requests:
                raise QueueFull(f"n={n} completions can never fit in the waiting queue "
                                f"(max_waiting_requests={self.max_waiting_requests})")
            waiting = self._num_pending_adds + self._engine_stats.get("num_waiting", 0)
            if waiting + n > self.max_waiting_requests:
                raise QueueFull(f"waiting queue is full ({waiting} of max_waiting_requests="
                                f"{self.max_waiting_requests} taken; this request needs n={n})")
            tracked = _Tracked(request_id, sink, n)
            self._requests[request_id] = tracked
            self._inbox.append(("add", tracked, add_kwargs, future))
            self._num_pending_adds += n
            self._cond.notify()
        return future

    def abort(self, request_id: str) -> None:
        """Aborts a request (no-op if it already finished); its sink gets finish "abort"."""
        with self._cond:
            if request_id in self._requests:
                self._inbox.append(("abort", request_id))
                self._cond.notify()

    def abort_all(self) -> None:
        with self._cond:
            for request_id in list(self._requests):
                self._inbox.append(("abort", request_id))
            self._cond.notify()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    @property
    def num_active(self) -> int:
        with self._cond:
            return len(self._requests)

    def stats(self) -> dict:
        with self._cond:
            stats = dict(self._engine_stats)
            stats.update(num_pending=self._num_pending_adds,
                         num_active_requests=len(self._requests),
                         num_finished_requests=self._num_finished,
                         num_aborted_requests=self._num_aborted,
                         num_steps=self._num_steps)
            return stats

    def close(self, timeout: Optional[float] = None) -> None:
        """Stops the engine thread (abort requests first: unfinished ones are dropped)."""
        with self._cond:
            self._accepting = False
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._has_work or self._closing):
                        self._cond.wait()
                    if self._closing and not self._inbox:
                        return
                    # Applied under the lock so that an add leaves the pending count and
                    # enters the engine's waiting count atomically for `add`'s bound check.
                    while self._inbox:
                        self._apply(self._inbox.popleft())
                    self._has_work = self.engine.has_unfinished_requests()
                    self._refresh_engine_stats()
                if self._has_work:
                    outputs = self.engine.step()
                    with self._cond:
                        self._num_steps += 1
                        deliveries = [d for d in map(self._collect, outputs) if d]
                        self._has_work = self.engine.has_unfinished_requests()
                        self._refresh_engine_stats()
                    for sink, deltas in deliveries:
                        self._deliver(sink, deltas)
        except BaseException as e:  # noqa: BLE001 - any engine failure ends serving
            logger.exception("engine loop failed")
            self._fail(f"{type(e).__name__}: {e}")

    def _apply(self, op: tuple) -> None:
        if op[0] == "add":
            _, tracked, kwargs, future = op
            self._num_pending_adds -= tracked.n
            # The caller may cancel its future at any moment (a client cancel or deadline
            # cancels the awaiting task, and asyncio.wrap_future passes that on). Moving the
            # future to RUNNING first makes it uncancellable from here on, so setting its
            # result below can never raise; a future already cancelled means the caller is
            # gone: the request never reaches the engine.
            if not future.set_running_or_notify_cancel():
                if self._requests.get(tracked.request_id) is tracked:
                    del self._requests[tracked.request_id]
                    self._num_aborted += 1
                return
            if self._requests.get(tracked.request_id) is not tracked:
                future.set_result(None)  # aborted before it reached the engine
                return
            try:
                self.engine.add_request(tracked.request_id, **kwargs)
            except Exception as e:  # ValueError: bad input; anything else: a bug for this request
                del self._requests[tracked.request_id]
                if isinstance(e, ValueError):
                    # Its traceback's frames (this one holds `future`, add_request's the token
                    # ids) would form a cycle with the future, freed only by a garbage collection.
                    e = e.with_traceback(None)
                future.set_exception(e)
                return
            tracked.in_engine = True
            future.set_result(None)
        else:
            tracked = self._requests.pop(op[1], None)
            if tracked is None:
                return
            if tracked.in_engine:
                self.engine.abort_request(tracked.request_id)
            self._num_aborted += 1
            final = [Delta(i, "", (), "abort", tracked.prompt_tokens, tracked.sent_num_tokens[i])
                     for i in range(tracked.n) if i not in tracked.finished]
            self._deliver(tracked.sink, final)

    def _collect(self, output: Any) -> Optional[tuple]:
        """Turns one cumulative RequestOutput into (sink, deltas) of what is new."""
        tracked = self._requests.get(output.request_id)
        if tracked is None:
            return None  # aborted meanwhile, or not ours (e.g. engine-internal)
        tracked.prompt_tokens = len(output.prompt_token_ids or ())
        deltas = []
        for completion in output.outputs:
            i = completion.index
            if i in tracked.finished or i >= tracked.n:
                continue
            finish = completion.finish_reason
            if output.finished and finish is None:
                finish = "stop"
            text, ids = completion.text, completion.token_ids
            if len(ids) == tracked.sent_num_tokens[i] and len(text) == tracked.sent_text_len[i] \
                    and finish is None:
                continue  # nothing new for this completion in this step
            logprobs = None
            if getattr(completion, "logprobs", None):
                logprobs = list(completion.logprobs[tracked.sent_num_tokens[i]:len(ids)])
            deltas.append(Delta(i, text[tracked.sent_text_len[i]:],
                                tuple(ids[tracked.sent_num_tokens[i]:]), finish,
                                tracked.prompt_tokens, len(ids), logprobs))
            tracked.sent_text_len[i] = len(text)
            tracked.sent_num_tokens[i] = len(ids)
            if finish is not None:
                tracked.finished.add(i)
        if len(tracked.finished) >= tracked.n or output.finished:
            del self._requests[tracked.request_id]
            self._num_finished += 1
        return (tracked.sink, deltas) if deltas else None

    def _refresh_engine_stats(self) -> None:
        self._engine_stats = dict(self.engine.get_stats())

    @staticmethod
    def _deliver(sink: Sink, item: Union[list, EngineFailure]) -> None:
        try:
            sink(item)
        except Exception:  # a closed event loop must not take the engine down
            logger.exception("dropping output for a request whose consumer is gone")

    def _fail(self, reason: str) -> None:
        with self._cond:
            self.dead_reason = reason
            self._accepting = False
            victims = list(self._requests.values())
            self._requests.clear()
            pending = [op for op in self._inbox if op[0] == "add"]
            self._inbox.clear()
            self._num_pending_adds = 0
        for op in pending:
            if op[3].set_running_or_notify_cancel():  # else the caller cancelled it
                op[3].set_exception(EngineUnavailable(f"engine failed: {reason}"))
        for tracked in victims:
            self._deliver(tracked.sink, EngineFailure(reason))
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:
                logger.exception("on_failure callback failed")


class BridgeEngineClient(EngineClient):
    """`EngineClient` over an `EngineBridge` driving an `LLMEngine` in this process."""

    def __init__(self, engine: Any, max_waiting_requests: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.generation_config = getattr(engine, "generation_config", None) or {}
        self.max_model_len = engine.max_model_len
        self.info = engine_model_info(engine)
        self._failure_callbacks: list[Callable[[str], None]] = []
        self.bridge = EngineBridge(engine, max_waiting_requests, on_failure=self._on_failure)
        self.bridge.start()

    def _on_failure(self, reason: str) -> None:
        for callback in self._failure_callbacks:
            callback(reason)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        self._failure_callbacks.append(callback)

    async def generate(self, request_id: str, *, params: SamplingParams, prompt: Optional[str] = None,
                       prompt_token_ids: Optional[Sequence[int]] = None, messages: Optional[list] = None,
                       system: Optional[str] = None) -> AsyncIterator[list[Delta]]:
        inputs = {k: v for k, v in dict(prompt=prompt, prompt_token_ids=prompt_token_ids,
                                          messages=messages, system=system).items() if v is not None}
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        accepted = self.bridge.add(request_id, sink, n=params.n, params=params, **inputs)
        complete = False
        try:
            try:
                await asyncio.wrap_future(accepted)
            except (ValueError, EngineUnavailable):
                complete = True  # never entered the engine
                raise
            remaining = params.n
            while remaining:
                item = await outputs.get()
                if isinstance(item, EngineFailure):
                    complete = True
                    raise EngineUnavailable(f"engine failed: {item.message}")
                remaining -= sum(1 for delta in item if delta.finish_reason)
                complete = not remaining
                yield item
        finally:
            # The consumer left early (break, error, cancel, deadline): free the blocks now
            # rather than when the request would have finished.
            if not complete:
                self.bridge.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self.bridge.abort(request_id)

    async def encode(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, text)

    def stats(self) -> dict:
        return self.bridge.stats()

    @property
    def dead_reason(self) -> Optional[str]:
        return self.bridge.dead_reason

    @property
    def num_active(self) -> int:
        return self.bridge.num_active

    def stop_accepting(self) -> None:
        self.bridge.stop_accepting()

    async def abort_all(self) -> None:
        self.bridge.abort_all()

    async def close(self) -> None:
        await asyncio.to_thread(self.bridge.close, 10)
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            await asyncio.to_thread(shutdown)


def engine_model_info(engine: Any) -> ModelInfo:
    """ModelInfo from an engine's resolved settings (what "auto" became, the KV blocks it got)."""
    config = engine.config
    return ModelInfo(
        model=config.model or "built-in tiny Qwen (random weights)",
        max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size,
        tensor_parallel_size=config.tensor_parallel_size,
        dtype=str(engine.executor.dtype).replace("torch.", ""), device=str(engine.executor.device),
        block_size=config.block_size, num_kv_blocks=engine.get_stats()["num_total_blocks"])
