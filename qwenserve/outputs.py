"""`RequestOutput` and `CompletionOutput`: what callers of the engine and `LLM` get back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative; only ever grows while the request runs
    token_ids: list[int]  # cumulative
    finish_reason: Optional[str] = None  # None while running; "stop" | "length" | "abort"
    # Per token (only when logprobs=N was asked for): the top-N (id, logprob) pairs, best first,
    # then the sampled token's pair if it is not among them (N=0: only the sampled token's).
    logprobs: Optional[list[list[tuple[int, float]]]] = None
    cumulative_logprob: Optional[float] = None  # only when logprobs were asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    queue_time: Optional[float] = None  # seconds from add_request to the first admission (None before)
