"""`AsyncLLM`: the `EngineClient` of the servers, over an engine core in its own process.

Owns the front end's half of serving: input processing off the event loop (validation,
tokenization, ChatML: `InputProcessor` in a worker thread, so a long prompt never stalls other
streams), the bounded waiting queue, one asyncio queue of deltas per request fed by the
output handler (`OutputProcessor`: detokenization, stop strings, which abort in the core at
once), aborts when a consumer leaves, the latest scheduler stats, and the core's death. A
completion the core ends with an error before its first token (it could not take the
request, e.g. a grammar that failed to compile there) makes `generate` raise that error as a
ValueError, whose message names the field, as the front end's own checks do.

    generate() ──► InputProcessor (thread) ──► AsyncCoreClient.add_requests ──► core
    core ──► AsyncCoreClient (receiver task) ──► _on_outputs: OutputProcessor ──► per-request
             queues ──► generate() yields list[Delta]; stop strings ──► core abort
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import AsyncIterator, Callable, Optional, Sequence

from qwenserve.config import EngineConfig
from qwenserve.engine_core import protocol as P
from qwenserve.engine_core.client import AsyncCoreClient, CoreProcess, EngineCoreDead
from qwenserve.frontend.engine_client import (Delta, EngineClient, EngineUnavailable, ModelInfo, QueueFull,
                                              StepStats)
from qwenserve.frontend.input_processor import InputProcessor
from qwenserve.frontend.output_processor import OutputProcessor
from qwenserve.model.checkpoint import builtin_model_dir
from qwenserve.model.hub import resolve_model_dir
from qwenserve.model.tokenizer import QwenTokenizer
from qwenserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 3600.0


class _Failed:
    """Put on a request's queue when the engine died under it."""

    def __init__(self, reason: str):
        self.reason = reason


class _Rejected:
    """Put on a request's queue when the core ended one of its completions with an error before
    any token (it could not take the request): `generate` raises it as a ValueError."""

    def __init__(self, reason: str):
        self.reason = reason


class AsyncLLM(EngineClient):
    """`AsyncLLM(config).start()` starts an engine core of its own (client 0);
    `AsyncLLM.attach(input_address, client_index)` shares a running one (another front end)."""

    def __init__(self, config: Optional[EngineConfig] = None, max_waiting_requests: Optional[int] = None):
        self.config = config or EngineConfig()
        # A directory, or a Hugging Face repo id fetched (or found in the local cache) here.
        self.model_dir = resolve_model_dir(self.config.model) if self.config.model else builtin_model_dir()
        self.max_waiting_requests = max_waiting_requests or self.config.max_waiting_requests
        self.client_index = 0
        self._queues: dict[str, asyncio.Queue] = {}
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._stats = P.SchedulerStats()
        self._num_waiting = 0          # completions accepted whose first token has not come
        self._waiting_ids: set[str] = set()
        self._num_pending = 0          # requests being processed, not yet handed to the core
        self._core_ids = itertools.count()  # makes each request's core id unique
        self._num_finished = 0
        self._num_aborted = 0
        self._accepting = True
        self._dead_reason: Optional[str] = None
        self.core_client: Optional[AsyncCoreClient] = None

    async def start(self, log_level: str = "INFO") -> "AsyncLLM":
        """Starts the engine-core process and waits for its model; raises
        `EngineCoreStartupError` when it cannot load."""
        process = CoreProcess(self.config, self.model_dir, log_level)
        self.core_client = AsyncCoreClient(process, self._on_outputs, self._on_dead)
        self._set_ready(await self.core_client.start(LOAD_TIMEOUT_S), self.config.model)
        return self

    @classmethod
    async def attach(cls, input_address: str, client_index: int,
                     max_waiting_requests: int = EngineConfig.max_waiting_requests) -> "AsyncLLM":
        """A front end sharing the engine core that listens at `input_address` (another
        AsyncLLM's `core_client.input_address`); `client_index` >= 1, unique per core. Its
        requests' outputs come to it alone; its `close()` leaves the core running."""
        self = cls.__new__(cls)
        cls.__init__(self, EngineConfig(), max_waiting_requests)
        self.client_index = client_index
        self.core_client = AsyncCoreClient.attach(input_address, client_index, self._on_outputs, self._on_dead)
        ready = await self.core_client.connect()
        self.model_dir = ready.model_dir
        self._set_ready(ready, ready.model_dir)
        return self

    def _set_ready(self, ready: P.EngineCoreReady, model_name: Optional[str]) -> None:
        self.ready = ready
        self.tokenizer = QwenTokenizer.from_dir(self.model_dir)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.generation_config = ready.generation_config or {}
        self.max_model_len = ready.max_model_len
        self.input_processor = InputProcessor(self.tokenizer, ready)
        self.info = ModelInfo(model=model_name or "built-in tiny Qwen (random weights)",
                              max_model_len=ready.max_model_len, vocab_size=ready.vocab_size,
                              tensor_parallel_size=ready.tensor_parallel_size, dtype=ready.dtype,
                              device=ready.device, block_size=ready.block_size,
                              num_kv_blocks=ready.num_kv_blocks)

    # ------------------------------------------------------------------ requests
    async def generate(self, request_id: str, *, params: SamplingParams, prompt: Optional[str] = None,
                       prompt_token_ids: Optional[Sequence[int]] = None, messages: Optional[list] = None,
                       system: Optional[str] = None,
                       continue_final_message: bool = False) -> AsyncIterator[list[Delta]]:
        self._check_accepting()
        if request_id in self.output_processor.requests or request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        n = params.n if isinstance(params, SamplingParams) else 1
        if n > self.max_waiting_requests:
            raise QueueFull(f"n={n} completions can never fit in the waiting queue "
                            f"(max_waiting_requests={self.max_waiting_requests})")
        waiting = self._num_waiting + self._num_pending
        if waiting + n > self.max_waiting_requests:
            raise QueueFull(f"waiting queue is full ({waiting} of max_waiting_requests="
                            f"{self.max_waiting_requests} taken; this request needs n={n})")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue  # claims the id while the input is processed
        self._num_pending += n
        state = None
        try:
            try:
                processed = await asyncio.to_thread(
                    self.input_processor.process, request_id, params=params, prompt=prompt,
                    prompt_token_ids=prompt_token_ids, messages=messages, system=system,
                    continue_final_message=continue_final_message, client_index=self.client_index,
                    core_request_id=f"{request_id}@{self.client_index}.{next(self._core_ids)}")
            finally:
                self._num_pending -= n
            self._check_accepting()
            state = self.output_processor.add_request(processed)
            core_ids = state.core_ids
            self._num_waiting += len(core_ids)
            self._waiting_ids.update(core_ids)
            try:
                await self.core_client.add_requests(processed.core_requests)
            except EngineCoreDead as e:
                raise EngineUnavailable(f"engine failed: {e}") from None
            remaining = len(core_ids)
            while remaining:
                item = await queue.get()
                if isinstance(item, _Failed):
                    raise EngineUnavailable(f"engine failed: {item.reason}")
                if isinstance(item, _Rejected):  # the reason names the field, as a front end's would
                    raise ValueError(item.reason)
                remaining -= sum(1 for delta in item if delta.finish_reason)
                yield item
        finally:
            # Finished: nothing left to do. Left early (a break, an error, the consumer's task
            # cancelled by a client cancel or deadline): abort, so the blocks are freed now.
            del self._queues[request_id]
            if state is not None:
                self._forget_waiting(state.core_ids)
                if self.output_processor.abort_request(request_id) is not None:
                    self._num_aborted += 1
                    if self._dead_reason is None:
                        # Not awaited: this may run while the consumer's task is being cancelled.
                        asyncio.ensure_future(self.core_client.abort(state.core_ids))

    def _check_accepting(self) -> None:
        if self._dead_reason is not None:
            raise EngineUnavailable(f"engine failed: {self._dead_reason}")
        if not self._accepting:
            raise EngineUnavailable("server is shutting down")

    def _forget_waiting(self, core_ids) -> None:
        for core_id in core_ids:
            if core_id in self._waiting_ids:
                self._waiting_ids.discard(core_id)
                self._num_waiting -= 1

    async def abort(self, request_id: str) -> None:
        aborted = self.output_processor.abort_request(request_id)
        if aborted is None:
            return
        state, deltas = aborted
        self._num_aborted += 1
        self._forget_waiting(state.core_ids)
        queue = self._queues.get(request_id)
        if queue is not None and deltas:
            queue.put_nowait(deltas)
        if self._dead_reason is None:
            await self.core_client.abort(state.core_ids)

    async def abort_all(self) -> None:
        for request_id in list(self.output_processor.requests):
            await self.abort(request_id)

    # ------------------------------------------------------------------ outputs
    def _on_outputs(self, message: P.EngineCoreOutputs) -> None:
        if message.stats is not None:
            self._stats = message.stats
        for num_tokens in message.step_num_tokens:
            self._notify_step(StepStats(num_tokens))
        if not message.outputs:
            return
        rejected: dict[str, str] = {}
        for output in message.outputs:
            if output.request_id in self._waiting_ids:
                self._waiting_ids.discard(output.request_id)
                self._num_waiting -= 1
            if output.error is not None:
                logger.warning("the engine core ended %s: %s", output.request_id, output.error)
                entry = self.output_processor.completion_of(output.request_id)
                if entry is not None and not entry[1].token_ids and not output.new_token_ids:
                    rejected[entry[0].request_id] = output.error
        processed = self.output_processor.process_outputs(message.outputs)
        if processed.core_ids_to_abort:
            asyncio.ensure_future(self.core_client.abort(processed.core_ids_to_abort))
        for request_id, deltas in processed.deltas.items():
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(_Rejected(rejected[request_id]) if request_id in rejected else deltas)
        self._num_finished += len(processed.finished)

    def _on_dead(self, reason: str) -> None:
        if self._dead_reason is not None:
            return
        self._dead_reason = reason
        self._accepting = False
        logger.error("engine core failed: %s", reason)
        for queue in self._queues.values():
            queue.put_nowait(_Failed(reason))
        for callback in self._failure_callbacks:
            try:
                callback(reason)
            except Exception:
                logger.exception("on_failure callback failed")

    # ------------------------------------------------------------------ the rest of EngineClient
    async def encode(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, text)

    def stats(self) -> dict:
        s = self._stats
        return {
            "num_used_blocks": s.num_used_blocks, "num_free_blocks": s.num_free_blocks,
            "num_total_blocks": s.num_total_blocks, "num_cached_blocks": s.num_cached_blocks,
            "num_waiting": s.num_waiting, "num_running": s.num_running,
            "num_preemptions": s.num_preemptions,
            "prefix_cache_hit_rate": s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
            "prefix_cache_query_tokens": s.prefix_cache_queries, "prefix_cache_hit_tokens": s.prefix_cache_hits,
            "num_pending": self._num_pending, "num_active_requests": len(self._queues),
            "num_finished_requests": self._num_finished, "num_aborted_requests": self._num_aborted,
            "num_steps": s.num_steps,
        }

    @property
    def scheduler_stats(self) -> P.SchedulerStats:
        return self._stats

    @property
    def dead_reason(self) -> Optional[str]:
        return self._dead_reason

    @property
    def num_active(self) -> int:
        return len(self._queues)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        self._failure_callbacks.append(callback)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def close(self) -> None:
        self._accepting = False
        if self.core_client is not None:
            await self.core_client.shutdown()
