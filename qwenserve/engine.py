"""`LLMEngine`: validates and admits requests, runs the step loop (schedule -> execute ->
append tokens, detokenize, check stops, free blocks) and reports `RequestOutput`s.

One engine step is one forward pass over the flat batch the scheduler chose. The engine is
not thread-safe: the server drives it from one thread.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Callable, Optional, Sequence

from qwenserve.config import EngineConfig
from qwenserve.kvcache import KVCacheManager
from qwenserve.model.chat_template import encode_chat
from qwenserve.model.checkpoint import builtin_model_dir
from qwenserve.model.config import QwenConfig, load_generation_config
from qwenserve.model.tokenizer import VOCAB_SIZE, QwenTokenizer, validate_ids
from qwenserve.output_processor import CompletionTracker
from qwenserve.outputs import RequestOutput
from qwenserve.sampling_params import SamplingParams
from qwenserve.scheduler.request import Request, RequestStatus
from qwenserve.scheduler.scheduler import Scheduler
from qwenserve.worker.executor import make_executor


class _Group:
    """The n completions of one user request; each completion is its own scheduler request."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 trackers: list[CompletionTracker]):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.trackers = trackers
        # Prompt tokens served from the prefix cache when the group was first admitted (set
        # by the first completion the scheduler admits; a resumption after preemption keeps it).
        self.num_cached_tokens: Optional[int] = None

    @property
    def finished(self) -> bool:
        for tracker in self.trackers:  # a loop, not all(...): this runs per request per step
            if tracker.finish_reason is None:
                return False
        return True

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [t.output() for t in self.trackers], self.finished,
                             num_cached_tokens=self.num_cached_tokens or 0)


class LLMEngine:
    def __init__(self, config: Optional[EngineConfig] = None,
                 load_progress: Optional[Callable[[int, int], None]] = None):
        self.config = config = config or EngineConfig()
        self.model_dir = config.model or builtin_model_dir()
        self.model_config = QwenConfig.from_dir(self.model_dir)
        self.tokenizer = QwenTokenizer.from_dir(self.model_dir)
        self.generation_config = load_generation_config(self.model_dir)
        limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({limit})")
        self.max_model_len = config.max_model_len or limit
        # The ids the model can sample: the tokenizer's, within the embedding's rows.
        self.vocab_size = min(VOCAB_SIZE, self.model_config.vocab_size)
        eos = self.generation_config.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self.chat_stop_token_ids = frozenset(
            ids[0] for ids in self.generation_config.get("stop_words_ids", []) if len(ids) == 1
        ) | {self.tokenizer.im_end_id, self.tokenizer.im_start_id}

        self.executor = make_executor(config, self.model_dir, load_progress)
        # Hashing stays on either way: without prefix caching, blocks are shared only among the
        # n completions of one request (`Request.cache_scope`).
        self.kv_cache = KVCacheManager(self.executor.num_blocks, config.block_size, enable_prefix_caching=True)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        self._groups: dict[str, _Group] = {}
        self._trackers: dict[str, tuple[_Group, CompletionTracker]] = {}  # by scheduler request id
        self._ids = itertools.count()
        self._scopes = itertools.count()  # one per request when prefix caching is off

    # ------------------------------------------------------------------ requests
    def default_params(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with `overrides` applied."""
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def add_request(self, request_id: Optional[str] = None, prompt: Optional[str] = None,
                    prompt_token_ids: Optional[Sequence[int]] = None, messages: Optional[list] = None,
                    system: Optional[str] = None, params: Optional[SamplingParams] = None) -> str:
        """Validates and queues a request; returns its id. Bad input raises ValueError."""
        if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
            raise ValueError("input: give exactly one of prompt, prompt_token_ids, messages")
        if request_id in (None, ""):
            request_id = next(rid for rid in map(str, self._ids) if rid not in self._groups)
        if request_id in self._groups:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        params = params if params is not None else self.default_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected a SamplingParams, got {type(params).__name__}")
        if messages is not None:
            ids = encode_chat(self.tokenizer, messages, system=system)
            stop_ids = self.eos_token_ids | self.chat_stop_token_ids
        elif prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError("prompt: must be a non-empty string")
            ids = self.tokenizer.encode(prompt)
            stop_ids = self.eos_token_ids
        else:
            if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Iterable):
                raise ValueError("prompt_token_ids: expected a list of token ids, "
                                 f"got {type(prompt_token_ids).__name__}")
            ids = validate_ids(list(prompt_token_ids))
            stop_ids = self.eos_token_ids
        if not ids:
            raise ValueError("prompt: the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within "
                             f"max_model_len ({self.max_model_len})")
        if params.ignore_eos:
            stop_ids = frozenset()
        stop_ids = frozenset(stop_ids) | self._checked_stop_token_ids(params)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        alpha = self.model_config.ntk_alpha(len(ids))

        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if any(rid in self._trackers for rid in child_ids):
            raise ValueError(f"request_id: {request_id!r} collides with a running request's completion ids")
        scope = None if self.config.enable_prefix_caching else next(self._scopes)
        requests, trackers = [], []
        for index, rid in enumerate(child_ids):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = _with_seed(params, params.seed + index)
            req = Request(rid, ids, child_params, max_tokens, alpha, stop_ids)
            req.cache_scope = scope
            requests.append(req)
            trackers.append(CompletionTracker(index, req, self.tokenizer, self.max_model_len))
        for req in requests:  # completions are alike: if one fits, all do
            self.scheduler.add_request(req)
        group = _Group(request_id, prompt, ids, trackers)
        self._groups[request_id] = group
        for req, tracker in zip(requests, trackers):
            self._trackers[req.request_id] = (group, tracker)
        return request_id

    def _checked_stop_token_ids(self, params: SamplingParams) -> frozenset:
        """params.stop_token_ids; ValueError for an id the model can never sample, and for a
        min_tokens whose ban (every stop id, until min_tokens) would leave no token to sample."""
        ids = frozenset(params.stop_token_ids)
        if ids and max(ids) >= self.vocab_size:
            raise ValueError(f"stop_token_ids: id {max(ids)} is out of range [0, {self.vocab_size})")
        if params.min_tokens and len(ids) >= self.vocab_size:
            raise ValueError(f"min_tokens: {params.min_tokens} with every token of the vocabulary a stop "
                             "token bans every token; leave at least one id out of stop_token_ids")
        return ids

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Aborts a request (all its completions) and frees its blocks; unknown ids are ignored."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        for tracker in group.trackers:
            self.scheduler.finish_request(tracker.request.request_id, RequestStatus.FINISHED_ABORTED)
            self._trackers.pop(tracker.request.request_id, None)
            tracker.abort()
        return group.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # ------------------------------------------------------------------ the step
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One forward pass; returns the outputs of the requests that changed (with
        `finished_only`, of those that finished: no output is built for the others, which
        saves host time per running request when nobody streams)."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        for new in scheduler_output.new_requests:  # admissions: record their prefix-cache hits
            entry = self._trackers.get(new.request_id)
            if entry is not None and entry[0].num_cached_tokens is None:
                entry[0].num_cached_tokens = min(new.num_computed_tokens, len(new.prompt_token_ids))
        result = self.executor.execute_model(scheduler_output)
        changed: dict[str, _Group] = {}
        for rid, token, logprob, top in zip(result.request_ids, result.sampled_token_ids,
                                           result.sampled_logprobs, result.logprobs):
            entry = self._trackers.get(rid)
            if entry is None:  # aborted while the step ran
                continue
            group, tracker = entry
            tracker.request.append_token(token)
            reason = tracker.append(token, logprob, top)
            if reason is not None:
                status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
                self.scheduler.finish_request(rid, status)
                del self._trackers[rid]
            changed[group.request_id] = group
        outputs = []
        for request_id, group in changed.items():
            if group.finished:
                outputs.append(group.output())
                del self._groups[request_id]
            elif not finished_only:
                outputs.append(group.output())
        return outputs

    # ------------------------------------------------------------------ introspection
    def get_stats(self) -> dict:
        kv = self.kv_cache
        return {
            "num_used_blocks": kv.num_used_blocks, "num_free_blocks": kv.num_free_blocks,
            "num_total_blocks": kv.num_blocks - 1, "num_cached_blocks": kv.num_cached_blocks,
            "num_waiting": self.scheduler.num_waiting, "num_running": self.scheduler.num_running,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": kv.prefix_cache_stats.hit_rate,
        }

    def shutdown(self) -> None:
        for request_id in list(self._groups):
            self.abort_request(request_id)
        self.executor.shutdown()


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed % 2 ** 64)
