"""`InputProcessor`: a user request -> the engine core's requests. The one validation path of
every front end (offline `LLM`, gRPC, HTTP), so they cannot disagree.

Owns: exactly-one-input checks, tokenization (plain text is never special; chat goes through
the ChatML template), id validation, length checks against max_model_len and the KV cache,
the stop-token set (EOS; plus <|im_end|>/<|im_start|> for chat; none with ignore_eos; plus the
request's stop_token_ids; a structured request's are the end tokens, `structured_output.termination`), max_tokens resolved to the room left, and the fan-out of n > 1 into
n core requests `id#i` whose seeds are seed + i. Every problem is a ValueError whose message
starts with the field's name. Tokenizing a long prompt takes time: servers call `process`
off their event loop.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Sequence

from qwenserve.engine_core.protocol import EngineCoreReady, EngineCoreRequest
from qwenserve.model.chat_template import encode_chat
from qwenserve.model.tokenizer import VOCAB_SIZE, QwenTokenizer, validate_ids
from qwenserve.sampling_params import SamplingParams
from qwenserve.structured_output import termination


@dataclass
class ProcessedRequest:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    core_requests: list[EngineCoreRequest]  # one per completion, in completion order


def completion_ids(request_id: str, n: int) -> list[str]:
    """The engine core's ids of a request's completions."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class InputProcessor:
    def __init__(self, tokenizer: QwenTokenizer, engine: EngineCoreReady):
        self.tokenizer = tokenizer
        self.max_model_len = engine.max_model_len
        self.block_size = engine.block_size
        self.num_kv_blocks = engine.num_kv_blocks
        self.generation_config = engine.generation_config or {}
        # The ids the model can sample: the tokenizer's, within the embedding's rows.
        self.vocab_size = min(VOCAB_SIZE, engine.vocab_size)
        eos = self.generation_config.get("eos_token_id", tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self.chat_stop_token_ids = frozenset(
            ids[0] for ids in self.generation_config.get("stop_words_ids", []) if len(ids) == 1
        ) | {tokenizer.im_end_id, tokenizer.im_start_id}

    def _checked_stop_token_ids(self, params: SamplingParams) -> frozenset:
        """params.stop_token_ids; ValueError for an id the model can never sample."""
        ids = frozenset(params.stop_token_ids)
        if ids and max(ids) >= self.vocab_size:
            raise ValueError(f"stop_token_ids: id {max(ids)} is out of range [0, {self.vocab_size})")
        return ids

    def _check_min_tokens_ban(self, params: SamplingParams, stop_ids: frozenset) -> None:
        """ValueError for a min_tokens whose ban (every stop id of the request, the EOS and chat
        ids the engine adds included, until min_tokens) would leave no token to sample."""
        if params.min_tokens and sum(1 for i in stop_ids if i < self.vocab_size) >= self.vocab_size:
            raise ValueError(f"min_tokens: {params.min_tokens} with every token of the vocabulary a stop "
                             "token (stop_token_ids with the end-of-text and chat stop tokens) bans every "
                             "token; leave at least one id out of stop_token_ids")

    def default_params(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with `overrides` applied."""
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def process(self, request_id: str, *, params: SamplingParams, prompt: Optional[str] = None,
                prompt_token_ids: Optional[Sequence[int]] = None, messages: Optional[list] = None,
                system: Optional[str] = None, continue_final_message: bool = False,
                arrival_time: Optional[float] = None, client_index: int = 0,
                core_request_id: Optional[str] = None) -> ProcessedRequest:
        """`continue_final_message` (chat only): the last message is an assistant's that the
        model continues instead of starting a new turn (see `chat_template.encode_chat`).
        `core_request_id`: the id the core knows the request by (default: `request_id`); a
        server makes it unique, so that a client reusing an id at once never meets the old
        request's outputs still on their way."""
        if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
            raise ValueError("input: give exactly one of prompt, prompt_token_ids, messages")
        if continue_final_message and messages is None:
            raise ValueError("continue_final_message: only applies to chat messages")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected a SamplingParams, got {type(params).__name__}")
        if messages is not None:
            ids = encode_chat(self.tokenizer, messages, system=system,
                              continue_final_message=continue_final_message)
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
        # A structured request ends on an end token where its grammar allows, whatever else.
        stop_ids = termination.stop_token_ids(params, frozenset(stop_ids) | self._checked_stop_token_ids(params))
        self._check_min_tokens_ban(params, stop_ids)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        needed = -(-(len(ids) + max_tokens) // self.block_size)
        if needed > self.num_kv_blocks:
            raise ValueError(
                f"max_tokens: the request needs up to {needed} KV blocks ({len(ids)} prompt "
                f"+ {max_tokens} new tokens) but the cache holds only {self.num_kv_blocks}; lower "
                f"max_tokens or give the KV cache more memory")

        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        sorted_stop_ids = sorted(stop_ids)
        core_requests = []
        for index, core_id in enumerate(completion_ids(core_request_id or request_id, params.n)):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=(params.seed + index) % 2 ** 64)
            core_requests.append(EngineCoreRequest(
                request_id=core_id, prompt_token_ids=ids, params=child_params, max_tokens=max_tokens,
                stop_token_ids=sorted_stop_ids, arrival_time=arrival_time, prefix_group=request_id,
                client_index=client_index))
        return ProcessedRequest(request_id, prompt, ids, params, stop_ids, core_requests)
