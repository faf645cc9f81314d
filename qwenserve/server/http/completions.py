"""POST /v1/completions: prompts (a string, strings, token ids or lists of them) -> text.

Owns the route's field mapping and response shapes. Each prompt is one engine request with
the request's n completions; choice `i * n + j` is completion j of prompt i (OpenAI's order).
"""
from __future__ import annotations

import asyncio
import functools
import numbers
from collections import defaultdict
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwenserve.frontend.engine_client import EngineUnavailable, QueueFull

from . import request_size
from .context import RouteContext, new_id, now
from .errors import APIError, from_exception
from .logprobs import merge_completion_logprobs
from .params import check_common, include_usage, sampling_params, structured_output
from .protocol import CompletionRequest
from .streaming import DONE, merged, prime, sse_event, sse_response, until_disconnected

# Engine field names in error messages -> this route's field.
ALIASES = {"prompt_token_ids": "prompt", "input": "prompt"}


def _is_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def engine_inputs(prompt: Any) -> list[dict]:
    """One engine input per prompt; APIError naming `prompt` for any other shape."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [{"prompt": p} for p in prompt]
        if all(_is_id(t) for t in prompt):
            return [{"prompt_token_ids": prompt}]
        if all(isinstance(p, list) and all(_is_id(t) for t in p) for p in prompt):
            return [{"prompt_token_ids": p} for p in prompt]
    if isinstance(prompt, list) and not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    raise APIError(400, "prompt: must be a string, a list of strings, a list of token ids or a list of "
                        "lists of token ids", param="prompt")


async def create_completion(ctx: RouteContext, http_request: Request, body: CompletionRequest) -> Response:
    check_common(body, ctx.served_model_name)
    for name, unsupported in (("echo", body.echo), ("suffix", body.suffix)):
        if unsupported:
            raise APIError(400, f"{name}: not supported", param=name, code="not_supported")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of: only best_of equal to n is supported", param="best_of", code="not_supported")
    request_size.check_stops(body.stop, body.stop_token_ids, ctx.limits)
    inputs = engine_inputs(body.prompt)
    request_size.check_prompts(inputs, ctx.limits)
    structured = structured_output(body)
    try:
        make_params = functools.partial(sampling_params, ctx.client, body, max_tokens=body.max_tokens,
                                        logprobs=body.logprobs, extra=structured.kwargs)
        # A new grammar compiles when the params are made (up to its time limit): not on the loop.
        params = await asyncio.to_thread(make_params) if structured.wanted else make_params()
        request_id = new_id("cmpl")
        streams = [ctx.client.generate(request_id if len(inputs) == 1 else f"{request_id}-{i}", params=params, **x)
                   for i, x in enumerate(inputs)]
        primed = await until_disconnected(http_request, prime(streams))
    except (ValueError, QueueFull, EngineUnavailable) as e:
        raise from_exception(e, dict(ALIASES, **structured.aliases)) from e
    head = {"id": request_id, "object": "text_completion", "created": now(), "model": ctx.served_model_name}
    if body.stream:
        return sse_response(_events(ctx, primed, head, params.n, include_usage(body)))
    return JSONResponse(await until_disconnected(http_request, _collect(ctx, primed, head, params.n)))


def _usage(prompt_tokens: dict, completion_tokens: dict) -> dict:
    p, c = sum(prompt_tokens.values()), sum(completion_tokens.values())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _events(ctx: RouteContext, primed: list, head: dict, n: int, usage: bool):
    prompt_tokens, completion_tokens, offsets = {}, {}, defaultdict(int)
    try:
        async with aclosing(merged(primed)) as outputs:  # closed even if the client left
            async for source, deltas in outputs:
                for d in deltas:
                    index = source * n + d.index
                    prompt_tokens[source], completion_tokens[index] = d.prompt_tokens, d.completion_tokens
                    logprobs = None
                    if d.logprobs:
                        logprobs, offsets[index] = ctx.formatter.completion(d.token_ids, d.logprobs, offsets[index])
                    if not (d.text or d.finish_reason or logprobs):
                        continue
                    chunk = dict(head, choices=[{"index": index, "text": d.text, "logprobs": logprobs,
                                                 "finish_reason": d.finish_reason}])
                    if usage:
                        chunk["usage"] = None
                    yield sse_event(chunk)
        if usage:
            yield sse_event(dict(head, choices=[], usage=_usage(prompt_tokens, completion_tokens)))
    except Exception as e:  # noqa: BLE001 - the 200 is out: the error is the last event
        yield sse_event(from_exception(e, ALIASES).body())
    finally:  # the client may have left before the outputs were read (no-op once they were)
        for stream in primed:
            await stream.aclose()
    yield DONE


async def _collect(ctx: RouteContext, primed: list, head: dict, n: int) -> dict:
    texts, finish, logprobs = defaultdict(list), {}, defaultdict(list)
    prompt_tokens, completion_tokens, offsets = {}, {}, defaultdict(int)
    async with aclosing(merged(primed)) as outputs:  # closed even if the client left
        async for source, deltas in outputs:
            for d in deltas:
                index = source * n + d.index
                texts[index].append(d.text)
                prompt_tokens[source], completion_tokens[index] = d.prompt_tokens, d.completion_tokens
                if d.logprobs:
                    part, offsets[index] = ctx.formatter.completion(d.token_ids, d.logprobs, offsets[index])
                    logprobs[index].append(part)
                if d.finish_reason:
                    finish[index] = d.finish_reason
    choices = [{"index": i, "text": "".join(texts[i]), "logprobs": merge_completion_logprobs(logprobs[i]),
                "finish_reason": finish.get(i)} for i in range(len(primed) * n)]
    return dict(head, choices=choices, usage=_usage(prompt_tokens, completion_tokens))
