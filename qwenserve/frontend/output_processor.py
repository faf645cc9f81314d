"""`OutputProcessor`: the engine core's per-step token deltas -> text deltas for callers.

Owns, per request and completion: incremental detokenization (never half a UTF-8 character),
stop strings (text is cut before the stop string; a stop string found here ends the
completion and asks the caller to abort it in the core), the hold-back of text that could
still become a stop string, the stop token's own text (never returned), and the grouping of
n completions under one request. Work per step is proportional to what is new (the stop
string search, the hold-back, the delta), except that appending the new text to the
completion's text copies that string: at 8k tokens of output, ~130 MB of memcpy in all (~15 ms
over the whole request), not worth a rope.

    core: EngineCoreOutput(core id, new_token_ids, new_logprobs, finish_reason)
        └─► CompletionState.update() ─► Delta(index, text, token_ids, finish_reason, ...)
              (stop string found: finish "stop", core id listed in `core_ids_to_abort`)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from qwenserve.engine_core.protocol import EngineCoreOutput
from qwenserve.frontend.engine_client import Delta
from qwenserve.frontend.input_processor import ProcessedRequest
from qwenserve.model.detokenizer import IncrementalDetokenizer
from qwenserve.model.tokenizer import QwenTokenizer
from qwenserve.outputs import CompletionOutput, RequestOutput
from qwenserve.structured_output import termination


class CompletionState:
    """One completion's text so far, and how much of it the caller has been given."""

    def __init__(self, index: int, request: "RequestState", tokenizer: QwenTokenizer):
        self.index = index
        self.request = request
        params = request.params
        # Inside a structure the structure wins: no stop strings (structured_output.termination).
        self.stop_strings = params.stop if termination.checks_stop_strings(params) else []
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.text = ""                 # everything decoded so far, cut at a stop string
        self.num_sent_chars = 0        # of `text`, given to the caller
        self.token_ids: list[int] = []
        self.logprobs: Optional[list] = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0 if params.logprobs is not None else None
        self.finish_reason: Optional[str] = None
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1

    def update(self, output: EngineCoreOutput) -> Delta:
        """Takes one core delta; returns the caller's delta (finish "stop" on a stop string)."""
        new_ids = output.new_token_ids
        first_new = len(self.token_ids)
        self.token_ids.extend(new_ids)
        if output.new_logprobs is not None and self.logprobs is not None:
            self.logprobs.extend(output.new_logprobs)
            for token, entry in zip(new_ids, output.new_logprobs):
                self.cumulative_logprob += next(lp for t, lp in entry if t == token)
        finish = output.finish_reason
        text_ids = new_ids
        if finish == "stop" and new_ids and new_ids[-1] in self.request.stop_token_ids:
            text_ids = new_ids[:-1]  # the stop token's own text is not returned
        before = len(self.text)
        self.text += self.detokenizer.push(text_ids)
        if finish is not None:
            self.text += self.detokenizer.flush()
        # Like stop tokens, stop strings count only once min_tokens are out.
        if self.stop_strings and finish != "abort" and len(self.token_ids) >= self.request.params.min_tokens \
                and self._cut_at_stop_string(before):
            finish = "stop"
        if finish is not None:
            self.finish_reason = finish
        end = len(self.text) if finish is not None else self._safe_length()
        text = self.text[self.num_sent_chars:end]
        self.num_sent_chars = max(self.num_sent_chars, end)
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.logprobs[first_new:]
        return Delta(self.index, text, tuple(new_ids), finish, len(self.request.prompt_token_ids),
                     len(self.token_ids), logprobs, self.request.queue_time)

    def abort(self) -> Delta:
        self.text += self.detokenizer.flush()
        self.finish_reason = "abort"
        return Delta(self.index, "", (), "abort", len(self.request.prompt_token_ids), len(self.token_ids))

    def _cut_at_stop_string(self, before: int) -> bool:
        # Only a stop string that ends in the new text can be new; search from just before it.
        start = max(0, before - self._hold)
        found = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
        if not found:
            return False
        self.text = self.text[:min(found)]
        return True

    def _safe_length(self) -> int:
        """Length of the text that cannot be the beginning of a stop string."""
        text = self.text
        if not self._hold:
            return len(text)
        for k in range(min(self._hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return len(text) - k
        return len(text)

    def output(self) -> CompletionOutput:
        """The completion so far, as the offline API reports it (text held back while running)."""
        text = self.text if self.finish_reason is not None else self.text[:self._safe_length()]
        return CompletionOutput(index=self.index, text=text, token_ids=list(self.token_ids),
                                finish_reason=self.finish_reason,
                                logprobs=None if self.logprobs is None else list(self.logprobs),
                                cumulative_logprob=self.cumulative_logprob)


@dataclass
class RequestState:
    """A user request: its n completions and its timings."""
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: object
    stop_token_ids: frozenset
    core_ids: list[str]
    arrival_time: float
    completions: list[CompletionState] = field(default_factory=list)
    num_cached_tokens: Optional[int] = None
    queue_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        for completion in self.completions:  # a loop, not all(...): this runs per request per step
            if completion.finish_reason is None:
                return False
        return True

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [c.output() for c in self.completions], self.finished,
                             num_cached_tokens=self.num_cached_tokens or 0, queue_time=self.queue_time)


@dataclass
class ProcessedOutputs:
    deltas: dict[str, list[Delta]]            # request id -> this step's deltas, in order
    finished: list[RequestState]              # requests whose every completion has ended
    core_ids_to_abort: list[str]              # completions a stop string ended here


class OutputProcessor:
    def __init__(self, tokenizer: QwenTokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._by_core_id: dict[str, tuple[RequestState, CompletionState]] = {}

    def add_request(self, processed: ProcessedRequest) -> RequestState:
        if processed.request_id in self.requests:
            raise ValueError(f"request_id: {processed.request_id!r} is already in use")
        core_ids = [r.request_id for r in processed.core_requests]
        if any(core_id in self._by_core_id for core_id in core_ids):
            raise ValueError(f"request_id: {processed.request_id!r} collides with a running "
                             "request's completion ids")
        state = RequestState(processed.request_id, processed.prompt, processed.prompt_token_ids,
                             processed.params, processed.stop_token_ids, core_ids,
                             processed.core_requests[0].arrival_time)
        state.completions = [CompletionState(i, state, self.tokenizer) for i in range(len(core_ids))]
        self.requests[state.request_id] = state
        for core_id, completion in zip(core_ids, state.completions):
            self._by_core_id[core_id] = (state, completion)
        return state

    def completion_of(self, core_id: str) -> Optional[tuple[RequestState, CompletionState]]:
        """The running completion a core id belongs to, with its request (None once ended)."""
        return self._by_core_id.get(core_id)

    def abort_request(self, request_id: str) -> Optional[tuple[RequestState, list[Delta]]]:
        """Ends a request here (its open completions get "abort"); returns it and those final
        deltas, or None when unknown. The caller aborts `state.core_ids` in the core."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        deltas = [c.abort() for c in state.completions if c.finish_reason is None]
        for core_id in state.core_ids:
            self._by_core_id.pop(core_id, None)
        return state, deltas

    def process_outputs(self, outputs: list[EngineCoreOutput], now: Optional[float] = None) -> ProcessedOutputs:
        now = time.monotonic() if now is None else now
        deltas: dict[str, list[Delta]] = {}
        finished, to_abort = [], []
        for output in outputs:
            entry = self._by_core_id.get(output.request_id)
            if entry is None:  # ended here (stop string, abort) while the core was still at it
                continue
            state, completion = entry
            if output.num_cached_tokens is not None and state.num_cached_tokens is None:
                state.num_cached_tokens = output.num_cached_tokens
                state.queue_time = output.queue_time
            if output.new_token_ids:
                if state.first_token_time is None:
                    state.first_token_time = now
                state.last_token_time = now
            delta = completion.update(output)
            deltas.setdefault(state.request_id, []).append(delta)
            if delta.finish_reason is not None:
                del self._by_core_id[output.request_id]
                if output.finish_reason is None:  # a stop string: the core does not know yet
                    to_abort.append(output.request_id)
                if state.finished:
                    del self.requests[state.request_id]
                    finished.append(state)
        return ProcessedOutputs(deltas, finished, to_abort)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)
