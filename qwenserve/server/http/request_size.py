"""The request-size limits of `qwenserve/frontend/limits.py` applied to HTTP bodies: the same
limits, defaults and checks as the gRPC servicer's, spelled with the HTTP request's field names
(`prompt`, `messages`, `stop`, `stop_token_ids`).

Each check runs on the parsed body before anything whose cost grows with the input (building
engine inputs, rendering a ReAct prompt, tokenizing), and fails with a 400 naming the field and
the limit. The body's byte size is checked before parsing (`app.read_body`, 413) against
`RequestLimits.max_request_bytes`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from qwenserve.frontend import limits as request_limits
from qwenserve.frontend.limits import RequestLimits

from .errors import APIError, field_of

# The check functions' field names -> the HTTP request's.
_ALIASES = {"prompt_token_ids": "prompt", "chat.messages": "messages", "chat": "messages"}


def _checked(check, *args) -> None:
    try:
        check(*args)
    except ValueError as e:
        param, message = field_of(str(e), _ALIASES)
        raise APIError(400, message, param=param) from None


def check_prompts(prompts: Sequence[dict], limits: RequestLimits) -> None:
    """Each engine input of a completion (`completions.engine_inputs`): text or token ids."""
    for prompt in prompts:
        if "prompt" in prompt:
            _checked(request_limits.check_prompt_chars, "prompt", len(prompt["prompt"]), limits)
        else:
            _checked(request_limits.check_prompt_token_ids, len(prompt["prompt_token_ids"]), limits)


def check_prompt_text(text: str, limits: RequestLimits) -> None:
    _checked(request_limits.check_prompt_chars, "prompt", len(text), limits)


def check_message_count(messages: Sequence[Any], limits: RequestLimits) -> None:
    """Before any message is read."""
    _checked(request_limits.check_chat_messages, len(messages), limits)


def check_chat_text(messages: Sequence[dict], system: Optional[str], limits: RequestLimits) -> None:
    """The text the chat template will tokenize: roles, contents and the system prompt (with
    tools, of the rendered ReAct conversation, instruction included)."""
    chars = len(system or "") + sum(len(m["role"]) + len(m.get("content") or "") for m in messages)
    _checked(request_limits.check_prompt_chars, "messages", chars, limits)


def check_stops(stop: Union[None, str, Sequence[str]], stop_token_ids: Optional[Sequence[int]],
                limits: RequestLimits) -> None:
    """`stop` (a string or a list) and `stop_token_ids`: both are checked on every step."""
    if stop is not None:
        _checked(request_limits.check_stop, [stop] if isinstance(stop, str) else stop, limits)
    if stop_token_ids is not None:
        _checked(request_limits.check_stop_token_ids, len(stop_token_ids), limits)
