"""`LLMEngine`: the offline engine: front-end processing around an `EngineCore`.

    add_request ─► InputProcessor (validate, tokenize, n fan-out) ─► core.add_requests
    step        ─► core.step() (one overlapped step) ─► OutputProcessor (text, stop strings)
                   ─► RequestOutputs of the requests that changed; stop strings abort in the core

The core runs in this thread (`EngineCore`), or with `engine_core_process` in a process of its
own behind the same interface (`SyncCoreClient`). The engine is not thread-safe (servers use
`frontend.async_llm.AsyncLLM`).
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

from qwenserve.config import EngineConfig
from qwenserve.engine_core.core import EngineCore
from qwenserve.frontend.input_processor import InputProcessor
from qwenserve.frontend.output_processor import OutputProcessor, RequestState
from qwenserve.model.checkpoint import builtin_model_dir
from qwenserve.model.config import QwenConfig
from qwenserve.model.hub import resolve_model_dir
from qwenserve.model.tokenizer import QwenTokenizer
from qwenserve.outputs import RequestOutput
from qwenserve.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: Optional[EngineConfig] = None,
                 load_progress: Optional[Callable[[int, int], None]] = None):
        self.config = config = config or EngineConfig()
        # A directory, or a Hugging Face repo id fetched (or found in the local cache) here.
        self.model_dir = resolve_model_dir(config.model) if config.model else builtin_model_dir()
        self.tokenizer = QwenTokenizer.from_dir(self.model_dir)
        if config.engine_core_process:
            from qwenserve.engine_core.client import SyncCoreClient

            self.core = SyncCoreClient(config, self.model_dir)
        else:
            self.core = EngineCore(config, self.model_dir, load_progress)
        self.model_config = QwenConfig.from_dir(self.model_dir)
        self.max_model_len = self.core.max_model_len
        ready = self.core.ready_message()
        self.generation_config = ready.generation_config
        self.input_processor = InputProcessor(self.tokenizer, ready)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        # Tokens the last step launched (prefill chunks and decodes; 0 when it only collected
        # samples, or with the core in another process): the iteration-size metric.
        self.num_tokens_last_step = 0

    # The core's parts, for tests and benchmarks that look inside (in-process core only).
    @property
    def scheduler(self):
        return self._in_process_core().scheduler

    @property
    def kv_cache(self):
        return self._in_process_core().scheduler.kv_cache

    @property
    def executor(self):
        return self._in_process_core().executor

    def _in_process_core(self) -> EngineCore:
        if not isinstance(self.core, EngineCore):
            raise AttributeError("the engine core runs in its own process (engine_core_process=True): "
                                 "its scheduler, KV cache and executor are not reachable from here")
        return self.core

    # ------------------------------------------------------------------ requests
    def default_params(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with `overrides` applied."""
        return self.input_processor.default_params(**overrides)

    def add_request(self, request_id: Optional[str] = None, prompt: Optional[str] = None,
                    prompt_token_ids: Optional[Sequence[int]] = None, messages: Optional[list] = None,
                    system: Optional[str] = None, params: Optional[SamplingParams] = None,
                    continue_final_message: bool = False) -> str:
        """Validates and queues a request; returns its id. Bad input raises ValueError.

        `continue_final_message` (chat only): the last message is an assistant's that the model
        continues instead of starting a new turn (see `chat_template.encode_chat`)."""
        if request_id in (None, ""):
            request_id = next(rid for rid in map(str, self._ids) if rid not in self.output_processor.requests)
        params = params if params is not None else self.default_params()
        processed = self.input_processor.process(request_id, params=params, prompt=prompt,
                                                 prompt_token_ids=prompt_token_ids, messages=messages,
                                                 system=system, continue_final_message=continue_final_message)
        self.output_processor.add_request(processed)
        try:
            self.core.add_requests(processed.core_requests)
        except BaseException:
            self.output_processor.abort_request(request_id)
            raise
        return request_id

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Aborts a request (all its completions) and frees its blocks; unknown ids are ignored."""
        aborted = self.output_processor.abort_request(request_id)
        if aborted is None:
            return None
        state, _ = aborted
        self.core.abort_requests(state.core_ids)
        return state.output()

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    # ------------------------------------------------------------------ the step
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One engine step; returns the outputs of the requests that changed (with
        `finished_only`, of those that finished: no output is built for the others, which
        saves host time per running request when nobody streams)."""
        processed = self.output_processor.process_outputs(self.core.step())
        self.num_tokens_last_step = getattr(self.core, "last_step_num_tokens", 0)
        if processed.core_ids_to_abort:
            self.core.abort_requests(processed.core_ids_to_abort)
        finished = {state.request_id: state for state in processed.finished}
        outputs = []
        for request_id in processed.deltas:
            state: Optional[RequestState] = finished.get(request_id)
            if state is None and not finished_only:
                state = self.output_processor.requests[request_id]
            if state is not None:
                outputs.append(state.output())
        return outputs

    # ------------------------------------------------------------------ introspection
    def get_stats(self) -> dict:
        stats = self.core.stats()
        return {
            "num_used_blocks": stats.num_used_blocks, "num_free_blocks": stats.num_free_blocks,
            "num_total_blocks": stats.num_total_blocks, "num_cached_blocks": stats.num_cached_blocks,
            "num_waiting": stats.num_waiting, "num_running": stats.num_running,
            "num_preemptions": stats.num_preemptions,
            "prefix_cache_hit_rate": (stats.prefix_cache_hits / stats.prefix_cache_queries
                                      if stats.prefix_cache_queries else 0.0),
            # Prompt tokens looked up in the prefix cache at admissions and found, cumulative.
            "prefix_cache_query_tokens": stats.prefix_cache_queries,
            "prefix_cache_hit_tokens": stats.prefix_cache_hits,
        }

    def shutdown(self) -> None:
        for request_id in list(self.output_processor.requests):
            self.abort_request(request_id)
        self.core.shutdown()
