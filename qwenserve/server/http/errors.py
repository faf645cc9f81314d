"""OpenAI's error object and the HTTP status of every failure.

Owns the mapping: bad input (`ValueError`, whose message starts with the field's name) -> 400,
missing or wrong API key -> 401, unknown model or route -> 404, a body over the size limit ->
413, waiting queue full (`QueueFull`) -> 429, engine failed / warming up / shutting down
(`EngineUnavailable`) -> 503. The body is always

    {"error": {"message": "...", "type": "...", "param": "temperature" | null, "code": ... | null}}

Only a bug is a 500, and even then the body says nothing about the code's insides.
"""
from __future__ import annotations

import json
import re
from typing import Optional

from starlette.responses import Response

from qwenserve.frontend.engine_client import EngineUnavailable, QueueFull

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}
# A ValueError's message starts with the field it is about: "temperature must be ...",
# "messages[1].role: unknown role ...", "prompt: 300 tokens leave no room ...".
_FIELD = re.compile(r"^([A-Za-z_]\w*)((?:\[\d+\]|\.[A-Za-z_]\w*)*)(?=[: ]|$)")
# The names SamplingParams and the engine use in their messages that a request spells the same.
SHARED_FIELDS = {name: name for name in (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "seed",
    "logprobs", "skip_special_tokens", "prompt", "messages", "tool_choice", "function_call", "tools",
    "functions", "response_format", "model", "tokens")}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: Optional[dict] = None) -> Response:
        return Response(json.dumps(self.body(), ensure_ascii=False), status_code=self.status,
                        media_type="application/json", headers=headers)


def field_of(message: str, aliases: Optional[dict] = None) -> tuple[Optional[str], str]:
    """(the request field a ValueError's message names, the message), the field spelled as the
    request spelled it: `aliases` maps the engine's names to the request's where they differ
    (logprobs -> top_logprobs, prompt_token_ids -> prompt, ...). None: no known field."""
    match = _FIELD.match(message)
    names = dict(SHARED_FIELDS, **(aliases or {}))
    if not match:
        return None, message
    if match.group(1) + match.group(2) in names:  # a dotted alias: "structured_output.regex"
        name = names[match.group(1) + match.group(2)]
        return name, name + message[match.end():]
    if match.group(1) not in names:
        return None, message
    name, rest = names[match.group(1)], match.group(2)
    return name + rest, name + rest + message[match.end():]


def from_exception(exc: Exception, aliases: Optional[dict] = None) -> APIError:
    """The APIError for what the engine client raised (anything unexpected is a 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        param, message = field_of(str(exc), aliases)
        return APIError(400, message, param=param)
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc), code="engine_unavailable")
    return APIError(500, f"internal error ({type(exc).__name__}); the server log has the details")
