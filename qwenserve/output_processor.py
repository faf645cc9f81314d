"""Per-completion text and stop handling: incremental detokenization, stop strings and stop
tokens, max_tokens and max_model_len, with the cumulative text only ever growing.

While a completion runs, text that could still turn out to be the start of a stop string is
held back, so that a streamed prefix is never taken back when the stop string completes.
"""
from __future__ import annotations

from typing import Optional

from qwenserve.model.detokenizer import IncrementalDetokenizer
from qwenserve.model.tokenizer import QwenTokenizer
from qwenserve.outputs import CompletionOutput
from qwenserve.scheduler.request import Request


def logprob_entry(token_id: int, logprob: float, top_logprobs) -> list[tuple[int, float]]:
    """One token's logprobs entry (vLLM's semantics): the top-N (id, logprob) pairs, best
    first, followed by the sampled token's pair when it is not among them (N=0: only it)."""
    entry = list(top_logprobs or ())
    for t, _ in entry:
        if t == token_id:
            return entry
    entry.append((token_id, logprob))
    return entry


class CompletionTracker:
    def __init__(self, index: int, request: Request, tokenizer: QwenTokenizer, max_model_len: int):
        self.index, self.request, self.max_model_len = index, request, max_model_len
        self.params = request.params
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=self.params.skip_special_tokens)
        self.text = ""  # everything decoded so far (stop strings not yet cut)
        self.token_ids: list[int] = []
        self.logprobs: Optional[list] = [] if self.params.logprobs is not None else None
        self.cumulative_logprob = 0.0 if self.params.logprobs is not None else None
        self.finish_reason: Optional[str] = None
        self._hold = max((len(s) for s in self.params.stop), default=1) - 1

    def append(self, token_id: int, logprob: float, top_logprobs) -> Optional[str]:
        """Adds one sampled token; returns the finish reason when the completion ends."""
        params = self.params
        self.token_ids.append(token_id)
        if self.logprobs is not None:
            self.cumulative_logprob += logprob
            self.logprobs.append(logprob_entry(token_id, logprob, top_logprobs))
        n = len(self.token_ids)
        can_stop = n >= params.min_tokens
        if can_stop and token_id in self.request.stop_token_ids:
            self.text += self.detokenizer.flush()  # the stop token's own text is not returned
            return self._finish("stop")
        before = len(self.text)
        self.text += self.detokenizer.push([token_id])
        if can_stop and params.stop and self._cut_at_stop_string(before):
            return self._finish("stop")
        if n >= self.request.max_tokens or self.request.num_tokens >= self.max_model_len:
            self.text += self.detokenizer.flush()
            if can_stop and params.stop and self._cut_at_stop_string(before):
                return self._finish("stop")
            return self._finish("length")
        return None

    def _cut_at_stop_string(self, before: int) -> bool:
        # Only a stop string that ends in the new text can be new; search from just before it.
        start = max(0, before - self._hold)
        found = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not found:
            return False
        self.text = self.text[:min(found)]
        return True

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        return reason

    def abort(self) -> None:
        if self.finish_reason is None:
            self.text += self.detokenizer.flush()
            self.finish_reason = "abort"

    def output(self) -> CompletionOutput:
        text = self.text
        if self.finish_reason is None and self._hold:
            text = text[:self._safe_length()]
        return CompletionOutput(index=self.index, text=text, token_ids=list(self.token_ids),
                                finish_reason=self.finish_reason,
                                logprobs=None if self.logprobs is None else list(self.logprobs),
                                cumulative_logprob=self.cumulative_logprob)

    def _safe_length(self) -> int:
        """Length of the text that cannot be the beginning of a stop string."""
        text = self.text
        for k in range(min(self._hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.params.stop):
                return len(text) - k
        return len(text)
