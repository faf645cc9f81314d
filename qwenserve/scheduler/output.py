"""`SchedulerOutput`: what the workers need for one step, as ids and integers only.

A request's token ids cross to the workers once (`NewRequestData`, also when a preempted
request is resumed); afterwards each step sends a `CachedRequestData` diff: the tokens
appended since the request was last scheduled and the block ids it gained.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qwenserve.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty only for a resumed (preempted) request
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits: tokens whose K/V already exist
    ntk_alpha: float
    params: SamplingParams
    banned_token_ids: list[int]  # stop ids masked while min_tokens is not reached


@dataclass
class CachedRequestData:
    request_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # in batch order
    finished_request_ids: list[str] = field(default_factory=list)  # workers drop their state
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens
