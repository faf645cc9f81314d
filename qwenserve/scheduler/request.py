"""`Request`: one completion's state as the scheduler sees it. Only the scheduler changes it."""
from __future__ import annotations

import enum
import time
from typing import Optional

from qwenserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


class Request:
    """Token ids so far, how many of them have K/V (`num_computed_tokens`), and the limits."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, ntk_alpha: float, stop_token_ids: frozenset[int],
                 arrival_time: Optional[float] = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.ntk_alpha = ntk_alpha
        self.stop_token_ids = stop_token_ids  # EOS and friends, already minus ignore_eos
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        # Samples being drawn by steps in flight whose tokens are not known yet (overlapped
        # scheduling): the next step already computes the position of such a token, whose id
        # the workers take from the device.
        self.num_output_placeholders = 0
        # Prompt tokens served from the prefix cache at the first admission, and the time of
        # that admission (None until then).
        self.num_cached_tokens = 0
        self.first_scheduled_time: Optional[float] = None
        self.client_index = 0
        # With prefix caching off, the n completions of one request still share their prompt's
        # blocks: their hashes are scoped to the group, so no other request can hit them.
        self.cache_scope: Optional[int] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def cache_salt(self):
        """What a cached block must match besides its tokens: Qwen's dynamic-NTK alpha (it
        changes the K/V), plus `cache_scope` when sharing is limited to one group of requests."""
        return self.ntk_alpha if self.cache_scope is None else (self.ntk_alpha, self.cache_scope)

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
