"""Request-size limits shared by every front end (the gRPC servicer, and the HTTP API through
`server/http/request_size.py`).

Owns the limits (`RequestLimits`), their defaults, and the checks. Each check is a pure function
over raw inputs (a length, a string, a sequence of strings) that raises `ValueError` naming the
field and the limit. Front ends call them first, before anything whose cost grows with the input:
copying a repeated field into a Python list, building message dicts, tokenizing. A rejected
request then costs what the transport already spent on it, and nothing more.

Where a limit can be derived from `max_model_len`, the default is the smallest value that never
rejects a request the engine could accept:

- a prompt of more than LONGEST_TOKEN_BYTES * (max_model_len - 1) characters has at least
  max_model_len tokens (a character is at least one UTF-8 byte, a token at most
  LONGEST_TOKEN_BYTES bytes), which the engine rejects anyway;
- a ChatML turn is at least 5 tokens (<|im_start|> role "\\n" content <|im_end|> "\\n") and the
  generation prompt 3, so more than (max_model_len - 4) // 5 messages never fit;
- a prompt of token ids must be shorter than max_model_len.

The others (request_id, stop strings and ids) are fixed caps: each is echoed or checked per step.
`max_request_bytes` (gRPC's max receive message size; the HTTP body limit) defaults to what the
other limits allow: 4 bytes per prompt character plus 1 MiB for everything else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

# The longest token of Qwen's vocabulary, in bytes (a run of 128 spaces; checked by a test).
LONGEST_TOKEN_BYTES = 128
# Tokens in the shortest ChatML turn and in the generation prompt (see the module docstring).
MIN_TOKENS_PER_CHAT_MESSAGE = 5
GENERATION_PROMPT_TOKENS = 3
# Room in a request for everything but the prompt: ids, stops, request_id, message framing.
REQUEST_OVERHEAD_BYTES = 1 << 20
# gRPC keeps its message size limit in an int32.
MAX_REQUEST_BYTES_LIMIT = 2 ** 31 - 1


@dataclass(frozen=True)
class RequestLimits:
    """The limits a front end enforces; None means "derive from max_model_len" (`resolve`)."""
    max_request_id_chars: int = 256        # echoed in every streamed message
    max_prompt_chars: Optional[int] = None  # prompt text, or a chat's roles + contents + system
    max_prompt_token_ids: Optional[int] = None  # derived only: max_model_len - 1
    max_chat_messages: Optional[int] = None
    max_stop_strings: int = 16
    max_stop_string_chars: int = 512
    max_stop_token_ids: int = 256          # room for all 208 special tokens
    max_request_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer or None, got {value!r}")
        if self.max_request_bytes is not None and self.max_request_bytes > MAX_REQUEST_BYTES_LIMIT:
            raise ValueError(f"max_request_bytes must be at most 2**31 - 1, got {self.max_request_bytes}")

    def resolve(self, max_model_len: int) -> "RequestLimits":
        """These limits with every None replaced by its value for `max_model_len`."""
        prompt_chars = self.max_prompt_chars or LONGEST_TOKEN_BYTES * max(1, max_model_len - 1)
        messages = self.max_chat_messages or max(
            1, (max_model_len - 1 - GENERATION_PROMPT_TOKENS) // MIN_TOKENS_PER_CHAT_MESSAGE)
        return dataclasses.replace(
            self, max_prompt_chars=prompt_chars, max_chat_messages=messages,
            max_prompt_token_ids=self.max_prompt_token_ids or max(1, max_model_len - 1),
            max_request_bytes=self.max_request_bytes or min(MAX_REQUEST_BYTES_LIMIT,
                                                            4 * prompt_chars + REQUEST_OVERHEAD_BYTES))


def _over(field: str, amount: int, unit: str, limit: Optional[int]) -> None:
    if limit is not None and amount > limit:
        raise ValueError(f"{field}: {amount} {unit} is over the server's limit of {limit}")


def check_request_id(num_chars: int, limits: RequestLimits) -> None:
    _over("request_id", num_chars, "characters", limits.max_request_id_chars)


def check_prompt_chars(field: str, num_chars: int, limits: RequestLimits) -> None:
    """Text to tokenize (`field`: prompt, chat, text): before it is tokenized."""
    _over(field, num_chars, "characters", limits.max_prompt_chars)


def check_prompt_token_ids(count: int, limits: RequestLimits) -> None:
    _over("prompt_token_ids", count, "token ids", limits.max_prompt_token_ids)


def check_chat_messages(count: int, limits: RequestLimits) -> None:
    """The number of messages, before any message is read."""
    _over("chat.messages", count, "messages", limits.max_chat_messages)


def check_stop(stop: Sequence[str], limits: RequestLimits) -> None:
    """Count first (len() of a proto repeated field copies nothing), then each string."""
    _over("stop", len(stop), "strings", limits.max_stop_strings)
    for i, s in enumerate(stop):
        _over(f"stop[{i}]", len(s), "characters", limits.max_stop_string_chars)


def check_stop_token_ids(count: int, limits: RequestLimits) -> None:
    _over("stop_token_ids", count, "ids", limits.max_stop_token_ids)
