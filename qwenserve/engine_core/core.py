"""`EngineCore`: the scheduler and the executor, stepping with the device kept busy.

It owns what runs on the engine's side of the front-end boundary: admission of
`EngineCoreRequest`s into the scheduler, aborts, and the step. It knows nothing of text,
chat templates or stop strings (the front end's), and nothing of processes or sockets
(`engine_core/process.py` runs it in its own process; the offline `LLMEngine` calls it
directly).

One `step()`: schedule step k, hand it to the executor, which launches it and returns the
samples of step k-1 (with `async_scheduling`; else of step k itself), then let the scheduler
take those samples back. Steps that computed something are remembered in order until their
samples are back, so each output meets the `SchedulerOutput` it belongs to.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable, Optional

from qwenserve.config import EngineConfig
from qwenserve.engine_core.protocol import EngineCoreOutput, EngineCoreReady, EngineCoreRequest, SchedulerStats
from qwenserve.kvcache import KVCacheManager
from qwenserve.model.config import QwenConfig, load_generation_config
from qwenserve.scheduler.output import SchedulerOutput
from qwenserve.scheduler.request import Request, RequestStatus
from qwenserve.scheduler.scheduler import Scheduler
from qwenserve.worker.executor import make_executor

logger = logging.getLogger(__name__)


def resolve_max_model_len(config: EngineConfig, model_config: QwenConfig) -> int:
    limit = model_config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({limit})")
    return config.max_model_len or limit


class EngineCore:
    def __init__(self, config: EngineConfig, model_dir: str,
                 load_progress: Optional[Callable[[int, int], None]] = None):
        self.config = config
        self.model_dir = model_dir
        self.model_config = QwenConfig.from_dir(model_dir)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self.executor = make_executor(config, model_dir, load_progress)
        # Hashing stays on either way: without prefix caching, blocks are shared only among the
        # n completions of one request (`Request.cache_scope`).
        kv_cache = KVCacheManager(self.executor.num_blocks, config.block_size, enable_prefix_caching=True)
        self.scheduler = Scheduler(kv_cache, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        # Steps handed to the executor whose samples have not come back, oldest first.
        self._in_flight: deque[SchedulerOutput] = deque()
        self.last_step_num_tokens = 0  # tokens the last step launched (0: it launched nothing)

    # ------------------------------------------------------------------ requests
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queues a request; ValueError (naming the field) when it can never run here."""
        if not request.prompt_token_ids:
            raise ValueError("prompt: the prompt is empty")
        scope = None
        if not self.config.enable_prefix_caching:
            scope = request.prefix_group or request.request_id
        req = Request(request.request_id, request.prompt_token_ids, request.params, request.max_tokens,
                      self.model_config.ntk_alpha(len(request.prompt_token_ids)),
                      frozenset(request.stop_token_ids), arrival_time=request.arrival_time)
        req.cache_scope = scope
        req.client_index = request.client_index
        self.scheduler.add_request(req)

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Queues a request's completions: all of them, or none (ValueError)."""
        added = []
        try:
            for request in requests:
                self.add_request(request)
                added.append(request.request_id)
        except BaseException:
            self.abort_requests(added)
            raise

    def abort_requests(self, request_ids) -> None:
        for request_id in request_ids:
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[EngineCoreOutput]:
        """Launches the next step and returns the deltas of the step whose samples came back."""
        scheduler_output = self.scheduler.schedule()
        self.last_step_num_tokens = scheduler_output.total_num_scheduled_tokens
        worker_news = scheduler_output.finished_request_ids or scheduler_output.preempted_request_ids
        if scheduler_output.is_empty and not self._in_flight and not worker_news:
            return []
        runner_output = self.executor.execute_model(scheduler_output)
        if not scheduler_output.is_empty:
            self._in_flight.append(scheduler_output)
        if runner_output is None:
            return []
        return self.scheduler.update_from_output(self._in_flight.popleft(), runner_output)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def ready_message(self) -> EngineCoreReady:
        config, executor = self.config, self.executor
        return EngineCoreReady(
            model_dir=self.model_dir, max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size, tensor_parallel_size=config.tensor_parallel_size,
            dtype=str(executor.dtype).replace("torch.", ""), device=str(executor.device),
            block_size=config.block_size, num_kv_blocks=self.scheduler.kv_cache.num_blocks - 1,
            generation_config=load_generation_config(self.model_dir))

    def check_health(self) -> None:
        """Raises when a worker is dead or does not answer."""
        self.executor.check_health()

    def shutdown(self) -> None:
        for request_id in list(self.scheduler.requests):
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self.executor.shutdown()
