"""`AsyncLLM`: the `EngineClient` of the servers, over engine cores in processes of their own.

Owns the front end's half of serving: input processing off the event loop (validation,
tokenization, ChatML: `InputProcessor` in a worker thread, so a long prompt never stalls other
streams), the bounded waiting queue, one asyncio queue of deltas per request fed by the
output handler (`OutputProcessor`: detokenization, stop strings, which abort in the core at
once), aborts when a consumer leaves, the latest scheduler stats, and the cores' deaths. A
completion a core ends with an error before its first token (it could not take the
request, e.g. a grammar that failed to compile there) makes `generate` raise that error as a
ValueError, whose message names the field, as the front end's own checks do.

    generate() ──► InputProcessor (thread) ──► router ──► AsyncCoreClient[i].add_requests ──► core i
    core i ──► AsyncCoreClient[i] (receiver task) ──► _on_outputs: OutputProcessor ──► per-request
               queues ──► generate() yields list[Delta]; stop strings ──► core i abort

One core (dp = 1): a `CoreProcess` on this machine, over ipc. N cores (`--dp N`): N Ray actors
(`engine_core/ray_replica.py`), over tcp, behind one `InputProcessor` and `OutputProcessor`;
the `DataParallelRouter` picks each request's core (its n completions all go there, in one
message), by prefix affinity (block hashes computed here, in the input thread, as the KV cache
computes them) and load. A dead core fails only its own requests (EngineUnavailable) and
leaves routing at once; the engine is dead, and `dead_reason` set, when every core is.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from typing import AsyncIterator, Callable, Optional, Sequence

from qwenserve.config import EngineConfig
from qwenserve.engine_core import protocol as P
from qwenserve.engine_core.client import AsyncCoreClient, CoreProcess, EngineCoreDead
from qwenserve.frontend.dp_router import DataParallelRouter, NoReplicaAlive
from qwenserve.frontend.engine_client import (Delta, EngineClient, EngineUnavailable, ModelInfo, QueueFull,
                                              StepStats, merge_deltas)
from qwenserve.frontend.input_processor import InputProcessor, ProcessedRequest
from qwenserve.frontend.output_processor import OutputProcessor
from qwenserve.kvcache import prefix_block_hashes
from qwenserve.model.checkpoint import builtin_model_dir
from qwenserve.model.config import QwenConfig
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


# Per-core stats that are occupancy (a dead core's count as 0) rather than counters since start.
_GAUGES = ("num_used_blocks", "num_free_blocks", "num_total_blocks", "num_cached_blocks", "num_waiting",
           "num_running")


def core_stats(s: P.SchedulerStats) -> dict:
    """One core's scheduler stats under `EngineClient.stats()`'s names."""
    return {"num_used_blocks": s.num_used_blocks, "num_free_blocks": s.num_free_blocks,
            "num_total_blocks": s.num_total_blocks, "num_cached_blocks": s.num_cached_blocks,
            "num_waiting": s.num_waiting, "num_running": s.num_running, "num_preemptions": s.num_preemptions,
            "prefix_cache_query_tokens": s.prefix_cache_queries, "prefix_cache_hit_tokens": s.prefix_cache_hits,
            "num_steps": s.num_steps}


class AsyncLLM(EngineClient):
    """`AsyncLLM(config).start()` starts engine cores of its own (client 0 of each:
    `config.data_parallel_size` of them); `AsyncLLM.attach(input_address, client_index)` shares
    a running one (another front end). `core_launchers` (default: one `CoreProcess` at
    dp = 1, Ray replicas at dp > 1) says where the cores run: anything with `CoreProcess`'s
    interface (tests run several local core processes behind one front end this way)."""

    def __init__(self, config: Optional[EngineConfig] = None, max_waiting_requests: Optional[int] = None,
                 core_launchers: Optional[list] = None):
        self.config = config or EngineConfig()
        # A directory, or a Hugging Face repo id fetched (or found in the local cache) here.
        self.model_dir = resolve_model_dir(self.config.model) if self.config.model else builtin_model_dir()
        self.max_waiting_requests = max_waiting_requests or self.config.max_waiting_requests
        self.client_index = 0
        self._queues: dict[str, asyncio.Queue] = {}
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._num_waiting = 0          # completions accepted whose first token has not come
        self._waiting_ids: set[str] = set()
        self._num_pending = 0          # requests being processed, not yet handed to the core
        self._core_ids = itertools.count()  # makes each request's core id unique
        self._num_finished = 0
        self._num_aborted = 0
        self._accepting = True
        self._dead_reason: Optional[str] = None
        self._core_launchers = core_launchers
        self._replica_set = None                     # the Ray replicas' groups (dp > 1)
        self.core_clients: list[AsyncCoreClient] = []
        self._replica_stats: list[P.SchedulerStats] = []
        self._replica_dead: list[Optional[str]] = []
        self._replica_of: dict[str, int] = {}        # request id -> the core it was sent to
        self.router: Optional[DataParallelRouter] = None

    @property
    def core_client(self) -> Optional[AsyncCoreClient]:
        """The first core's client (the only one at dp = 1)."""
        return self.core_clients[0] if self.core_clients else None

    async def start(self, log_level: str = "INFO") -> "AsyncLLM":
        """Starts the engine cores and waits for their models; raises `EngineCoreStartupError`
        when one cannot load (call `close()` then: it stops those that did)."""
        launchers = self._core_launchers
        if launchers is None and self.config.data_parallel_size == 1:
            launchers = [CoreProcess(self.config, self.model_dir, log_level)]
        elif launchers is None:
            from qwenserve.engine_core.ray_replica import start_ray_replicas  # Ray only when dp > 1

            self._replica_set = await asyncio.to_thread(start_ray_replicas, self.config, self.model_dir, log_level)
            launchers = self._replica_set.replicas
        self.core_clients = [AsyncCoreClient(launcher, functools.partial(self._on_outputs, i),
                                             functools.partial(self._on_replica_dead, i))
                             for i, launcher in enumerate(launchers)]
        self._replica_stats = [P.SchedulerStats() for _ in launchers]
        self._replica_dead = [None for _ in launchers]
        started = await asyncio.gather(*(c.start(LOAD_TIMEOUT_S) for c in self.core_clients),
                                       return_exceptions=True)
        for result in started:
            if isinstance(result, BaseException):
                raise result
        self._set_ready(started, self.config.model)
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
        self.core_clients = [AsyncCoreClient.attach(input_address, client_index, functools.partial(self._on_outputs, 0),
                                                    functools.partial(self._on_replica_dead, 0))]
        self._replica_stats, self._replica_dead = [P.SchedulerStats()], [None]
        ready = await self.core_client.connect()
        self.model_dir = ready.model_dir
        self._set_ready([ready], ready.model_dir)
        return self

    def _set_ready(self, readies: list[P.EngineCoreReady], model_name: Optional[str]) -> None:
        # The cores run the same model and settings; a request must fit the smallest KV cache.
        ready = min(readies, key=lambda r: r.num_kv_blocks)
        self.ready = ready
        self.tokenizer = QwenTokenizer.from_dir(self.model_dir)
        self.model_config = QwenConfig.from_dir(self.model_dir)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.generation_config = ready.generation_config or {}
        self.max_model_len = ready.max_model_len
        self.input_processor = InputProcessor(self.tokenizer, ready)
        self.router = DataParallelRouter(len(readies), self.config.data_parallel_routing,
                                         index_capacity=max(ready.num_kv_blocks, 1))
        self.info = ModelInfo(model=model_name or "built-in tiny Qwen (random weights)",
                              max_model_len=ready.max_model_len, vocab_size=ready.vocab_size,
                              tensor_parallel_size=ready.tensor_parallel_size, dtype=ready.dtype,
                              device=ready.device, block_size=ready.block_size,
                              num_kv_blocks=ready.num_kv_blocks, data_parallel_size=len(readies))

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
        state, replica = None, None
        try:
            try:
                processed, block_hashes = await asyncio.to_thread(
                    self._process_input, request_id, params=params, prompt=prompt,
                    prompt_token_ids=prompt_token_ids, messages=messages, system=system,
                    continue_final_message=continue_final_message, client_index=self.client_index,
                    core_request_id=f"{request_id}@{self.client_index}.{next(self._core_ids)}")
            finally:
                self._num_pending -= n
            self._check_accepting()
            try:
                replica = self.router.choose(block_hashes, -(-len(processed.prompt_token_ids) // self.ready.block_size))
            except NoReplicaAlive:
                raise EngineUnavailable(f"engine failed: {self._dead_reason}") from None
            state = self.output_processor.add_request(processed)
            core_ids = state.core_ids
            self._num_waiting += len(core_ids)
            self._waiting_ids.update(core_ids)
            self._replica_of[request_id] = replica
            self.router.on_routed(replica, len(core_ids), block_hashes)
            try:
                await self.core_clients[replica].add_requests(processed.core_requests)
            except EngineCoreDead as e:
                raise EngineUnavailable(f"engine failed: {e}") from None
            remaining = len(core_ids)
            held = None  # a failure found while merging: raised after the deltas before it
            while remaining:
                item = held if held is not None else await queue.get()
                held = None
                if isinstance(item, _Failed):
                    raise EngineUnavailable(f"engine failed: {item.reason}")
                if isinstance(item, _Rejected):  # the reason names the field, as a front end's would
                    raise ValueError(item.reason)
                if not queue.empty():
                    # The consumer fell behind (a busy event loop): the steps waiting go out as
                    # one message per completion, not one each, which is what lets it catch up.
                    steps = list(item)
                    while not queue.empty():
                        waiting = queue.get_nowait()
                        if not isinstance(waiting, list):
                            held = waiting
                            break
                        steps += waiting
                    item = merge_deltas(steps)
                remaining -= sum(1 for delta in item if delta.finish_reason)
                yield item
        finally:
            # Finished: nothing left to do. Left early (a break, an error, the consumer's task
            # cancelled by a client cancel or deadline): abort, so the blocks are freed now.
            del self._queues[request_id]
            self._replica_of.pop(request_id, None)
            if state is not None:
                self.router.on_finished(replica, len(state.core_ids))
                self._forget_waiting(state.core_ids)
                if self.output_processor.abort_request(request_id) is not None:
                    self._num_aborted += 1
                    if self._replica_dead[replica] is None:
                        # Not awaited: this may run while the consumer's task is being cancelled.
                        asyncio.ensure_future(self.core_clients[replica].abort(state.core_ids))

    def _process_input(self, request_id: str, **inputs) -> tuple[ProcessedRequest, list[bytes]]:
        """In a worker thread: the core requests, and the prompt's block hashes when the router
        routes by prefix (the KV cache's own: chained, salted with the prompt's NTK alpha)."""
        processed = self.input_processor.process(request_id, **inputs)
        if not (self.router.wants_block_hashes and self.config.enable_prefix_caching):
            return processed, []
        ids = processed.prompt_token_ids
        return processed, prefix_block_hashes(ids, self.ready.block_size, self.model_config.ntk_alpha(len(ids)))

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
        replica = self._replica_of.get(request_id)
        if replica is not None and self._replica_dead[replica] is None:
            await self.core_clients[replica].abort(state.core_ids)

    async def abort_all(self) -> None:
        for request_id in list(self.output_processor.requests):
            await self.abort(request_id)

    # ------------------------------------------------------------------ outputs
    def _on_outputs(self, replica: int, message: P.EngineCoreOutputs) -> None:
        if message.stats is not None:
            self._replica_stats[replica] = stats = message.stats
            if self.router is not None:  # None while other cores still load
                self.router.update_stats(replica, stats.num_waiting, stats.num_running)
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
            asyncio.ensure_future(self.core_clients[replica].abort(processed.core_ids_to_abort))
        for request_id, deltas in processed.deltas.items():
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(_Rejected(rejected[request_id]) if request_id in rejected else deltas)
        self._num_finished += len(processed.finished)

    def _on_replica_dead(self, replica: int, reason: str) -> None:
        """A core failed or exited: its requests fail, routing forgets it; the engine is dead
        once every core is."""
        if self._replica_dead[replica] is not None:
            return
        self._replica_dead[replica] = reason
        if self.router is not None:
            self.router.remove(replica)
        if all(dead is not None for dead in self._replica_dead):
            self._on_dead(reason)
            return
        logger.error("engine core replica %d failed, %d of %d still serving: %s", replica,
                     sum(dead is None for dead in self._replica_dead), len(self._replica_dead), reason)
        for request_id, routed_to in self._replica_of.items():
            queue = self._queues.get(request_id)
            if routed_to == replica and queue is not None:
                queue.put_nowait(_Failed(reason))

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

    def replica_stats(self) -> list[dict]:
        """Per core: `replica` (its index), `alive`, `num_routed_requests`, and its latest
        scheduler stats (a dead core's occupancy as 0, its counters as last reported)."""
        out = []
        for i, (stats, dead) in enumerate(zip(self._replica_stats, self._replica_dead)):
            entry = core_stats(stats)
            if dead is not None:
                entry.update(dict.fromkeys(_GAUGES, 0))
            entry.update(replica=i, alive=dead is None,
                         num_routed_requests=self.router.replicas[i].num_routed if self.router else 0)
            out.append(entry)
        return out

    def stats(self) -> dict:
        """Sums over the cores (`replica_stats` has each), plus this front end's counts."""
        replicas = self.replica_stats()
        total = {name: sum(r[name] for r in replicas) for name in core_stats(P.SchedulerStats())}
        queries, hits = total["prefix_cache_query_tokens"], total["prefix_cache_hit_tokens"]
        total.update(prefix_cache_hit_rate=hits / queries if queries else 0.0,
                     num_pending=self._num_pending, num_active_requests=len(self._queues),
                     num_finished_requests=self._num_finished, num_aborted_requests=self._num_aborted)
        return total

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
        await asyncio.gather(*(client.shutdown() for client in self.core_clients))
        if self._replica_set is not None:
            await asyncio.to_thread(self._replica_set.close)
            self._replica_set = None
