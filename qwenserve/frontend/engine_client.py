"""`EngineClient`: what a front end (the gRPC servicer, the HTTP app, the warm-up) needs from
the engine, whatever process the engine runs in.

Owns the contract only: the per-step `Delta`, the errors a call can end with, the model
facts a front end reports (`ModelInfo`), and the abstract client. Front ends never reach
past it to the engine, so the engine can move (a thread, its own process, several replicas)
without a front end changing.

A call's life, seen from a front end:

    async for deltas in client.generate(request_id, params=..., prompt=...):   # list[Delta]
        ...                       # one list per engine step: the completions that changed
                                  # (several steps' worth, merged, when the caller fell behind)
    # ends once each of the params.n completions has sent its finish_reason

Errors come out of the iterator: `ValueError` (bad input; the message starts with the field's
name) and `QueueFull` / `EngineUnavailable` before the first delta; `EngineUnavailable` later
when the engine dies under the request. Leaving the loop early (break, an exception, the
consuming task cancelled by a client cancel or deadline) aborts the request and frees its
KV blocks; nothing a caller does can change the engine beyond aborting its own request.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Sequence

from qwenserve.sampling_params import SamplingParams


class QueueFull(Exception):
    """The waiting queue is at `max_waiting_requests` (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


class EngineUnavailable(Exception):
    """The engine has failed, is not ready yet, or is shutting down (UNAVAILABLE, HTTP 503)."""


@dataclass(frozen=True)
class Delta:
    """What one completion gained in one engine step (or in several consecutive steps, when
    `merge_deltas` joined them)."""
    index: int                    # which of the request's n completions
    text: str                     # new text (never a partial UTF-8 character, never past a stop string)
    token_ids: tuple              # new token ids
    finish_reason: Optional[str]  # None while running; "stop" | "length" | "abort" at the end
    prompt_tokens: int
    completion_tokens: int        # tokens of this completion so far
    # One entry per new token when logprobs were asked for: the top-N (id, logprob) pairs,
    # best first, then the sampled token's pair when it is not among them.
    logprobs: Optional[list] = None
    # Seconds the request waited in the engine before it was first scheduled (None until
    # then); the request-queue-time metric reads it from the first delta.
    queue_time: Optional[float] = None


def merge_deltas(deltas: Sequence[Delta]) -> list[Delta]:
    """Consecutive steps' deltas as one per completion, in order of first appearance: the text,
    ids and logprobs joined, the latest counts and finish reason, the first queue time. What a
    consumer that fell behind gets, so that it sends one message where it would send several."""
    merged: dict[int, Delta] = {}
    for delta in deltas:
        earlier = merged.get(delta.index)
        if earlier is None:
            merged[delta.index] = delta
            continue
        logprobs = None
        if earlier.logprobs is not None or delta.logprobs is not None:
            logprobs = list(earlier.logprobs or ()) + list(delta.logprobs or ())
        merged[delta.index] = Delta(
            index=delta.index, text=earlier.text + delta.text,
            token_ids=tuple(earlier.token_ids) + tuple(delta.token_ids), finish_reason=delta.finish_reason,
            prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens, logprobs=logprobs,
            queue_time=earlier.queue_time if earlier.queue_time is not None else delta.queue_time)
    return list(merged.values())


@dataclass(frozen=True)
class StepStats:
    """One engine step, as `EngineClient.on_step` callbacks see it."""
    num_tokens: int               # tokens the step computed (prefill chunks + decodes)


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the engine's resolved settings."""
    model: str                    # the checkpoint (directory, or a description of the built-in model)
    max_model_len: int
    vocab_size: int
    tensor_parallel_size: int
    dtype: str                    # what "auto" became, e.g. "bfloat16"
    device: str                   # e.g. "cuda:0", "cpu"
    block_size: int
    num_kv_blocks: int            # per engine core (the smallest, with several)
    data_parallel_size: int = 1   # engine cores behind this front end


class EngineClient(abc.ABC):
    """The engine as front ends see it. Subclasses set `tokenizer`, `generation_config`,
    `max_model_len` and `info`, and call `_notify_step` once per engine step."""

    tokenizer: object             # qwenserve.model.tokenizer.QwenTokenizer
    generation_config: dict       # the checkpoint's generation_config.json ({} when absent)
    max_model_len: int
    info: ModelInfo

    def default_params(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config defaults with `overrides` applied (None values
        are ignored); ValueError naming the field for a bad value."""
        return SamplingParams.from_generation_config(self.generation_config or {}, **overrides)

    @abc.abstractmethod
    def generate(self, request_id: str, *, params: SamplingParams, prompt: Optional[str] = None,
                 prompt_token_ids: Optional[Sequence[int]] = None, messages: Optional[list] = None,
                 system: Optional[str] = None,
                 continue_final_message: bool = False) -> AsyncIterator[list[Delta]]:
        """Runs one request (exactly one of prompt, prompt_token_ids, messages; `system` and
        `continue_final_message` only with messages) and yields each step's deltas; see the
        module docstring. `continue_final_message`: the last message is an assistant's that
        the model continues (no new turn), as `chat_template.encode_chat` renders it."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Aborts a request by id (unknown or finished ids are ignored)."""

    @abc.abstractmethod
    async def encode(self, text: str) -> list[int]:
        """Plain-text token ids (special-token text is not special), off the event loop."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """A snapshot of occupancy and counters: num_used_blocks, num_free_blocks,
        num_total_blocks, num_cached_blocks, num_waiting, num_running, num_preemptions,
        prefix_cache_hit_rate, prefix_cache_query_tokens, prefix_cache_hit_tokens (cumulative
        prompt tokens looked up in / served from the prefix cache), num_pending,
        num_active_requests, num_finished_requests, num_aborted_requests, num_steps."""

    def replica_stats(self) -> list[dict]:
        """Per engine core: its `stats()` share (the engine-side keys) plus `replica` (its index)
        and `alive`. Default: the whole engine as core 0."""
        return [dict(self.stats(), replica=0, alive=self.dead_reason is None)]

    def on_step(self, callback: Callable[[StepStats], None]) -> None:
        """Registers `callback(StepStats)`, called after every engine step (on any thread; it
        must be quick and must not raise)."""
        self.__dict__.setdefault("_step_callbacks", []).append(callback)

    def _notify_step(self, stats: StepStats) -> None:
        for callback in self.__dict__.get("_step_callbacks", ()):
            callback(stats)

    @property
    @abc.abstractmethod
    def dead_reason(self) -> Optional[str]:
        """Why the engine failed, or None while it is alive."""

    @property
    @abc.abstractmethod
    def num_active(self) -> int:
        """Requests accepted and not yet finished."""

    @abc.abstractmethod
    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Registers `callback(reason)`, called once (on any thread) when the engine fails."""

    @abc.abstractmethod
    def stop_accepting(self) -> None:
        """From now on `generate` raises EngineUnavailable("... shutting down"); running
        requests continue."""

    @abc.abstractmethod
    async def abort_all(self) -> None:
        """Aborts every running request (each stream ends with finish_reason "abort")."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stops the engine and its workers; the client is unusable afterwards."""
