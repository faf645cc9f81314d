"""The `qwenserve.v1.Generation` gRPC service (asyncio).

Owns the translation between proto messages and the engine's world: request validation
and the proto -> `SamplingParams` mapping (an unset optional field means the server
default), status codes for every failure, and turning the engine client's per-step `Delta`s into
`GenerateResponse` messages. The engine itself is only reached through an `EngineClient`.

Status codes: bad input -> INVALID_ARGUMENT (the message names the field), including a
request over a size limit (`qwenserve/frontend/limits.py`, checked before anything else),
waiting queue full -> RESOURCE_EXHAUSTED, engine dead / warming up / shutting down -> UNAVAILABLE.
A call that ends early (client cancel, deadline) aborts its request in `finally`.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Optional

import grpc

from qwenserve.frontend import limits as request_limits
from qwenserve.frontend.engine_client import Delta, EngineClient, EngineUnavailable, ModelInfo, QueueFull
from qwenserve.frontend.limits import RequestLimits
from qwenserve.structured_output import StructuredOutput

from . import qwenserve_pb2 as pb
from . import qwenserve_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# proto3 `optional` fields of pb.SamplingParams copied only when the client set them.
OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "logprobs",
    "presence_penalty", "frequency_penalty", "min_p", "n", "min_tokens", "skip_special_tokens",
)
# Float fields travel as float32; round them back to the decimal the client most likely
# meant (0.9, not 0.8999999761581421) so validation messages and comparisons read naturally.
_FLOAT_FIELDS = {"temperature", "top_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "min_p"}


def sampling_kwargs(params: pb.SamplingParams) -> dict:
    """The keywords of `SamplingParams` the client set; everything else stays default."""
    kwargs: dict[str, Any] = {}
    for name in OPTIONAL_SAMPLING_FIELDS:
        if params.HasField(name):
            value = getattr(params, name)
            kwargs[name] = float(f"{value:.7g}") if name in _FLOAT_FIELDS else value
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if params.ignore_eos:
        kwargs["ignore_eos"] = True
    structured = structured_output(params)
    if structured is not None:
        kwargs["structured_output"] = structured
    return kwargs


def structured_output(params: pb.SamplingParams) -> Optional[StructuredOutput]:
    """The `structured_output` oneof as a StructuredOutput (None when unset); ValueError
    naming the field for a shape error (compiling is SamplingParams' check)."""
    form = params.WhichOneof("structured_output")
    if form is None:
        return None
    if form == "json_object" and not params.json_object:
        raise ValueError("structured_output.json_object: must be true when set")
    value = list(params.choice.choices) if form == "choice" else getattr(params, form)
    kwargs: dict[str, Any] = {form: value}
    if params.HasField("disable_any_whitespace"):
        kwargs["disable_any_whitespace"] = params.disable_any_whitespace
    return StructuredOutput(**kwargs)


def enforce_limits(request: pb.GenerateRequest, limits: RequestLimits) -> None:
    """The request-size limits (ValueError naming the field), checked on the message as it
    arrived: only lengths and bounded loops, before any repeated field is copied or any text
    is tokenized."""
    request_limits.check_request_id(len(request.request_id), limits)
    which = request.WhichOneof("input")
    if which == "prompt":
        request_limits.check_prompt_chars("prompt", len(request.prompt), limits)
    elif which == "prompt_token_ids":
        request_limits.check_prompt_token_ids(len(request.prompt_token_ids.ids), limits)
    elif which == "chat":
        messages = request.chat.messages
        request_limits.check_chat_messages(len(messages), limits)
        chars = len(request.system) + sum(len(m.role) + len(m.content) for m in messages)
        request_limits.check_prompt_chars("chat", chars, limits)
    request_limits.check_stop(request.params.stop, limits)
    request_limits.check_stop_token_ids(len(request.params.stop_token_ids), limits)


def engine_input(request: pb.GenerateRequest) -> dict:
    """The input keywords of `engine.add_request`; ValueError naming the field if absent."""
    which = request.WhichOneof("input")
    if request.system and which != "chat":
        raise ValueError("system: only applies to chat input")
    if which is None:
        raise ValueError("input: one of prompt, prompt_token_ids or chat is required")
    if which == "prompt":
        if not request.prompt:
            raise ValueError("prompt: must not be empty")
        return {"prompt": request.prompt}
    if which == "prompt_token_ids":
        if not request.prompt_token_ids.ids:
            raise ValueError("prompt_token_ids: must not be empty")
        return {"prompt_token_ids": list(request.prompt_token_ids.ids)}
    if not request.chat.messages:
        raise ValueError("chat: needs at least one message")
    messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    return {"messages": messages, "system": request.system or None}


def _logprobs_message(entry: Any) -> pb.TokenLogprobs:
    """One token's logprobs entry, from a dict {id: lp} or pairs [(id, lp)]: the top-N pairs,
    then the sampled token's pair when it is not among them (N=0: only the sampled token's)."""
    pairs = entry.items() if isinstance(entry, dict) else (entry or ())
    return pb.TokenLogprobs(top=[pb.TokenLogprob(token_id=int(t), logprob=float(lp)) for t, lp in pairs])


def model_info_message(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                        tensor_parallel_size=info.tensor_parallel_size, dtype=info.dtype,
                        device=info.device, block_size=info.block_size, num_kv_blocks=info.num_kv_blocks,
                        num_gpu_blocks=info.num_kv_blocks, data_parallel_size=info.data_parallel_size)


def response_message(request_id: str, delta: Delta) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id, index=delta.index, text=delta.text, token_ids=delta.token_ids,
        finish_reason=delta.finish_reason or "", prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens,
        logprobs=[_logprobs_message(e) for e in delta.logprobs or ()])


def end_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """Ends a streaming call with `code` once the handler returns. Not `context.abort()`: the
    exception it raises is kept by gRPC with a traceback through the handler's frame, a
    reference cycle that holds the request (up to max_request_bytes) until the next garbage
    collection; on an idle server that is a long time."""
    context.set_code(code)
    context.set_details(details)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: EngineClient, limits: Optional[RequestLimits] = None):
        self.engine = engine
        self.limits = (limits or RequestLimits()).resolve(engine.max_model_len)
        self.info = model_info_message(engine.info)
        # Set by the app once the warm-up generation succeeded; until then, UNAVAILABLE.
        self.ready = False

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if not self.ready:
            end_call(context, grpc.StatusCode.UNAVAILABLE, "server is not ready yet")
            return
        try:
            enforce_limits(request, self.limits)
            add_kwargs = engine_input(request)
            # The same path as the HTTP front end's: the checkpoint's defaults, then the request's
            # values, validated by SamplingParams (compiling a new grammar may take up to its time
            # limit: not on the event loop).
            kwargs = sampling_kwargs(request.params)
            if request.params.WhichOneof("structured_output") is None:
                params = self.engine.default_params(**kwargs)
            else:
                params = await asyncio.to_thread(self.engine.default_params, **kwargs)
        except ValueError as e:
            end_call(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        request_id = request.request_id or uuid.uuid4().hex
        # Each failure below ends the call; leaving the loop for any reason (client cancel,
        # deadline) aborts the request inside `generate`.
        status = None
        try:
            async for deltas in self.engine.generate(request_id, params=params, **add_kwargs):
                for delta in deltas:
                    yield response_message(request_id, delta)
        except ValueError as e:
            status = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            status = (grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineUnavailable as e:
            status = (grpc.StatusCode.UNAVAILABLE, str(e))
        except Exception as e:  # noqa: BLE001 - a bug for this request, not the server
            logger.exception("request %s failed", request_id)
            status = (grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        if status is not None:
            end_call(context, *status)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        num_chars = len(request.text)
        try:
            request_limits.check_prompt_chars("text", num_chars, self.limits)
        except ValueError as e:
            del request  # see end_call: a unary call's abort ties this frame into a cycle
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # Off the event loop: a long text must not stall every stream.
        ids = await self.engine.encode(request.text)
        return pb.TokenizeResponse(ids=ids)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return self.info

    async def GetStats(self, request, context) -> pb.Stats:
        replicas = [pb.ReplicaStats(**_scalar_fields(pb.ReplicaStats, r)) for r in self.engine.replica_stats()]
        return pb.Stats(**_scalar_fields(pb.Stats, self.engine.stats()), replicas=replicas)


def _scalar_fields(message_type, values: dict) -> dict:
    """The entries of `values` that are scalar fields of `message_type`, typed for it."""
    fields = {f.name: f for f in message_type.DESCRIPTOR.fields if f.type != f.TYPE_MESSAGE}
    out = {}
    for name, value in values.items():
        field = fields.get(name)
        if field is None or value is None:
            continue
        if field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
            out[name] = float(value)
        elif field.type == field.TYPE_BOOL:
            out[name] = bool(value)
        else:
            out[name] = int(value)
    return out
