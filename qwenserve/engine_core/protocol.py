"""The messages between front ends and the engine core, as msgspec structs (msgpack on the wire).

    front end ──► core   [EngineCoreRequest]      one per completion (n > 1 is n of them, sent
                                                  together so they are admitted together)
                         EngineCoreAbort          request ids to abort
                         EngineCoreUtility        a call answered by EngineCoreUtilityResult
                                                  (stats, health, shutdown)
                         EngineCoreHello          another front end joins (TAG_HELLO) or
                                                  leaves (TAG_GOODBYE)
    core ──► front end   EngineCoreOutputs        per step and client: the requests that
                                                  gained tokens or finished, and the
                                                  scheduler's stats
                         EngineCoreReady          once, after the model loaded (or
                                                  EngineCoreStartupFailed)
                         EngineCoreUtilityResult

Only ids, numbers and short strings cross: a request's prompt ids once, then per step each
request's new token ids (deltas, never the whole output), their logprobs when asked for, and
the finish reason. The prompt text, the tokenizer and detokenization stay in the front end.
"""
from __future__ import annotations

from typing import Any, Optional

import msgspec

from qwenserve.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str                # unique per core (the front end makes it so)
    prompt_token_ids: list[int]
    params: SamplingParams         # validated by the front end
    max_tokens: int                # resolved: min(params.max_tokens, room left in max_model_len)
    stop_token_ids: list[int]      # resolved: EOS (+ chat stops) + params.stop_token_ids, unless ignore_eos
    arrival_time: float            # time.monotonic() at the front end (CLOCK_MONOTONIC is system-wide)
    # Completions of one user request share this: with prefix caching off, their prompt blocks
    # are still shared among them, and with nobody else.
    prefix_group: Optional[str] = None
    client_index: int = 0


class EngineCoreHello(msgspec.Struct, array_like=True):
    """A front end joining a running core: where its outputs go."""
    client_index: int
    output_address: str


class EngineCoreAbort(msgspec.Struct, array_like=True):
    request_ids: list[str]


class EngineCoreUtility(msgspec.Struct, array_like=True):
    call_id: int
    method: str                    # "stats" | "check_health" | "describe" | "shutdown"
    client_index: int = 0          # where the answer goes


class EngineCoreUtilityResult(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: Optional[str] = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one request gained in one step."""
    request_id: str
    new_token_ids: list[int]
    # One entry per new token when logprobs were asked for: the top-N (id, logprob) pairs,
    # then the sampled token's pair when it is not among them.
    new_logprobs: Optional[list[list[tuple[int, float]]]] = None
    finish_reason: Optional[str] = None   # "stop" | "length" | "abort"
    # Set on a request's first output: prompt tokens served from the prefix cache, and the
    # seconds from arrival to first being scheduled.
    num_cached_tokens: Optional[int] = None
    queue_time: Optional[float] = None
    error: Optional[str] = None           # why the core rejected or dropped the request


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True):
    num_running: int = 0
    num_waiting: int = 0
    num_used_blocks: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_cached_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0            # since start
    prefix_cache_queries: int = 0       # tokens looked up, since start
    prefix_cache_hits: int = 0          # tokens hit, since start
    num_steps: int = 0                  # since start
    step_num_tokens: int = 0            # tokens computed by the step these outputs come from


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    stats: Optional[SchedulerStats] = None
    timestamp: float = 0.0
    # Tokens computed by each step since the previous message to this client (iteration sizes).
    step_num_tokens: list[int] = []
    # Set when the core failed: every request of every client is dead, and so is the core.
    engine_dead: Optional[str] = None


class EngineCoreReady(msgspec.Struct, array_like=True):
    """What a front end needs to know about the engine, sent once the model is loaded."""
    model_dir: str
    max_model_len: int
    vocab_size: int
    tensor_parallel_size: int
    dtype: str
    device: str
    block_size: int
    num_kv_blocks: int
    generation_config: dict


class EngineCoreStartupFailed(msgspec.Struct, array_like=True):
    """Sent instead of `EngineCoreReady` when the model could not be loaded."""
    error_type: str                # the exception's type name
    message: str
    bad_setting: bool              # a ValueError or OSError: a bad setting, path or checkpoint


# Every message kind on one socket direction, told apart by a one-byte tag before the payload.
TAG_REQUEST, TAG_ABORT, TAG_UTILITY, TAG_HELLO, TAG_GOODBYE = b"R", b"A", b"U", b"H", b"G"
TAG_OUTPUTS, TAG_READY, TAG_STARTUP_FAILED, TAG_UTILITY_RESULT = b"O", b"Y", b"F", b"T"
INPUT_TYPES = {TAG_REQUEST: list[EngineCoreRequest], TAG_ABORT: EngineCoreAbort,
               TAG_UTILITY: EngineCoreUtility, TAG_HELLO: EngineCoreHello, TAG_GOODBYE: EngineCoreHello}
OUTPUT_TYPES = {TAG_OUTPUTS: EngineCoreOutputs, TAG_UTILITY_RESULT: EngineCoreUtilityResult,
                TAG_READY: EngineCoreReady, TAG_STARTUP_FAILED: EngineCoreStartupFailed}
