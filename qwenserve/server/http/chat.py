"""POST /v1/chat/completions: messages (and tools) -> an assistant message per choice.

Owns the route's field mapping and response shapes, streamed and not. With tools, each
choice's text goes through a `ReactOutputParser`: its content events become `content`, a call
becomes `tool_calls` (or the legacy `function_call`) and the choice finishes "tool_calls" /
"function_call" when the model stopped on its own (at "Observation:", or, where it had to call
a function, at the end of the turn right after the arguments); a call cut off by
max_tokens keeps finish_reason "length". Streamed and whole responses carry the same content
and calls, because the whole response is the stream's events folded together.
"""
from __future__ import annotations

import asyncio
import functools
import uuid
from contextlib import aclosing
from typing import Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwenserve.frontend.engine_client import EngineUnavailable, QueueFull
from qwenserve.model.react import OBSERVATION_STOP, ReactOutputParser, fold_events

from . import request_size
from .chat_input import ChatInput, call_structure_aliases, chat_input
from .context import RouteContext, new_id, now
from .errors import APIError, from_exception
from .params import check_common, include_usage, sampling_params, structured_output
from .protocol import ChatCompletionRequest
from .streaming import DONE, merged, prime, sse_event, sse_response, until_disconnected


def _aliases(body: ChatCompletionRequest) -> dict:
    """Engine field names in error messages -> this route's fields."""
    aliases = {"logprobs": "top_logprobs", "prompt": "messages", "system": "messages", "input": "messages"}
    if body.max_completion_tokens is not None:
        aliases["max_tokens"] = "max_completion_tokens"
    return aliases


async def create_chat_completion(ctx: RouteContext, http_request: Request, body: ChatCompletionRequest) -> Response:
    check_common(body, ctx.served_model_name)
    structured = structured_output(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    request_size.check_stops(body.stop, body.stop_token_ids, ctx.limits)
    request_size.check_message_count(body.messages, ctx.limits)
    request = chat_input(body)
    request_size.check_chat_text(request.engine_kwargs["messages"], request.engine_kwargs.get("system"), ctx.limits)
    if structured.wanted and request.plan.functions:
        # The ReAct format a call needs is not the structure asked for; one would break the other.
        field_name = next(iter(structured.aliases.values()))
        raise APIError(400, f"{field_name}: structured output cannot be combined with tools or functions "
                            "(unless tool_choice / function_call is \"none\")", param=field_name)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    aliases = dict(_aliases(body), **structured.aliases)
    structure = structured.kwargs
    if request.call_structure is not None:
        structure = {"structured_output": request.call_structure}
        aliases.update(call_structure_aliases(request.plan))
    try:
        make_params = functools.partial(
            sampling_params, ctx.client, body, max_tokens=max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            extra_stop=(OBSERVATION_STOP,) if request.plan.functions else (), extra=structure)
        # A new grammar compiles when the params are made (up to its time limit): not on the loop.
        params = await asyncio.to_thread(make_params) if structure else make_params()
        request_id = new_id("chatcmpl")
        stream = ctx.client.generate(request_id, params=params, **request.engine_kwargs)
        primed = await until_disconnected(http_request, prime([stream]))
    except (ValueError, QueueFull, EngineUnavailable) as e:
        raise from_exception(e, aliases) from e
    head = {"id": request_id, "object": "chat.completion", "created": now(), "model": ctx.served_model_name}
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    choices = [_Choice(i, request, top_logprobs) for i in range(params.n)]
    if body.stream:
        head["object"] = "chat.completion.chunk"
        return sse_response(_events(ctx, primed, head, choices, include_usage(body), _aliases(body)))
    return JSONResponse(await until_disconnected(http_request, _collect(ctx, primed, head, choices)))


class _Choice:
    """One choice's progress: its parser (with tools) and what its response needs."""

    def __init__(self, index: int, request: ChatInput, top_logprobs: Optional[int]):
        self.index, self.style, self.top_logprobs = index, request.plan.style, top_logprobs
        self.parser = None
        if request.parser_start is not None:
            self.parser = ReactOutputParser(request.parser_start, request.plan.forced, calls=bool(request.plan.functions))
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.events: list = []
        self.logprobs: list = []
        self.completion_tokens = 0

    def feed(self, text: str, finished: bool) -> list:
        """This step's events (content, call, arguments)."""
        if self.parser is None:
            events = [("content", text)] if text else []
        else:
            events = self.parser.feed(text) + (self.parser.finish() if finished else [])
        self.events += events
        return events

    def finish_reason(self, engine_reason: str) -> str:
        if engine_reason == "stop" and any(kind == "call" for kind, _ in self.events):
            return "tool_calls" if self.style == "tools" else "function_call"
        return engine_reason

    def delta(self, kind: str, text: str) -> dict:
        """A stream delta for one event."""
        if kind == "content":
            return {"content": text}
        function = {"name": text, "arguments": ""} if kind == "call" else {"arguments": text}
        if self.style == "functions":
            return {"function_call": function}
        call = {"index": 0, "id": self.call_id, "type": "function", "function": function} if kind == "call" \
            else {"index": 0, "function": function}
        return {"tool_calls": [call]}

    def message(self) -> dict:
        result = fold_events(self.events)
        # A call's message may have no content (null, as OpenAI sends it); an answer always has text.
        message = {"role": "assistant", "content": result.content if result.call else (result.content or "")}
        if result.call:
            function = {"name": result.call[0], "arguments": result.call[1]}
            if self.style == "functions":
                message["function_call"] = function
            else:
                message["tool_calls"] = [{"id": self.call_id, "type": "function", "function": function}]
        return message


def _usage(prompt_tokens: int, choices: list) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _logprobs(ctx: RouteContext, choice: _Choice, delta) -> Optional[list]:
    if choice.top_logprobs is None or not delta.logprobs:
        return None
    return ctx.formatter.chat(delta.token_ids, delta.logprobs, choice.top_logprobs)


async def _events(ctx: RouteContext, primed: list, head: dict, choices: list, usage: bool, aliases: dict):
    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> bytes:
        body = dict(head, choices=[{"index": index, "delta": delta,
                                    "logprobs": {"content": logprobs} if logprobs is not None else None,
                                    "finish_reason": finish_reason}])
        if usage:
            body["usage"] = None
        return sse_event(body)

    prompt_tokens = 0
    try:
        for choice in choices:
            yield chunk(choice.index, {"role": "assistant", "content": ""})
        async with aclosing(merged(primed)) as outputs:  # closed even if the client left
            async for _, deltas in outputs:
                for d in deltas:
                    choice = choices[d.index]
                    prompt_tokens, choice.completion_tokens = d.prompt_tokens, d.completion_tokens
                    logprobs = _logprobs(ctx, choice, d)
                    pieces = [choice.delta(kind, text) for kind, text in choice.feed(d.text, bool(d.finish_reason))]
                    if logprobs and not pieces:
                        pieces = [{}]  # the tokens' logprobs go out even while their text is held back
                    for k, piece in enumerate(pieces):
                        yield chunk(d.index, piece, logprobs if k == 0 else None)
                    if d.finish_reason:
                        yield chunk(d.index, {}, finish_reason=choice.finish_reason(d.finish_reason))
        if usage:
            yield sse_event(dict(head, choices=[], usage=_usage(prompt_tokens, choices)))
    except Exception as e:  # noqa: BLE001 - the 200 is out: the error is the last event
        yield sse_event(from_exception(e, aliases).body())
    finally:  # the client may have left before the outputs were read (no-op once they were)
        for stream in primed:
            await stream.aclose()
    yield DONE


async def _collect(ctx: RouteContext, primed: list, head: dict, choices: list) -> dict:
    finish, prompt_tokens = {}, 0
    async with aclosing(merged(primed)) as outputs:  # closed even if the client left
        async for _, deltas in outputs:
            for d in deltas:
                choice = choices[d.index]
                prompt_tokens, choice.completion_tokens = d.prompt_tokens, d.completion_tokens
                choice.logprobs += _logprobs(ctx, choice, d) or []
                choice.feed(d.text, bool(d.finish_reason))
                if d.finish_reason:
                    finish[d.index] = choice.finish_reason(d.finish_reason)
    return dict(head, choices=[{"index": c.index, "message": c.message(),
                                "logprobs": {"content": c.logprobs} if c.top_logprobs is not None else None,
                                "finish_reason": finish.get(c.index)} for c in choices],
                usage=_usage(prompt_tokens, choices))
