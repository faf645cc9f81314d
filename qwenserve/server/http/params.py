"""OpenAI request fields -> the engine's `SamplingParams`, through the path gRPC uses.

Owns the field mapping of both completion routes. The values are not checked here: unset
fields take the checkpoint's generation_config defaults and every value is validated by
`EngineClient.default_params` (`SamplingParams.from_generation_config`), exactly as the gRPC
servicer does, so a value one front end accepts the other accepts too. Also owns the checks of
OpenAI fields that have no engine counterpart yet (they are refused by name, never ignored)
and the hook where structured output (`response_format`) will plug in.
"""
from __future__ import annotations

from typing import Optional

from qwenserve.sampling_params import SamplingParams

from .errors import APIError
from .protocol import ResponseFormat, _SamplingFields

# Fields copied as they are (OpenAI's, then vLLM's extras).
_SAMPLING_FIELDS = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k",
                    "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                    "skip_special_tokens")


def sampling_params(client, request: _SamplingFields, *, max_tokens: Optional[int], logprobs: Optional[int],
                    extra_stop: tuple = (), extra: Optional[dict] = None) -> SamplingParams:
    """The request's SamplingParams (ValueError naming the engine's field for a bad value).
    `extra_stop`: stop strings the route adds (function calling's "Observation:"); `extra`:
    further SamplingParams keywords (structured output's)."""
    kwargs = {name: getattr(request, name) for name in _SAMPLING_FIELDS}
    kwargs.update(extra or {})
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    kwargs.update(max_tokens=max_tokens, logprobs=logprobs,
                  stop=(stop + [s for s in extra_stop if s not in stop]) or None)
    return client.default_params(**kwargs)


def check_common(request: _SamplingFields, served_model_name: str) -> None:
    """404 for another model's name; 400 for OpenAI fields this server cannot honour."""
    if request.model is not None and request.model != served_model_name:
        raise APIError(404, f"The model `{request.model}` does not exist; this server serves "
                            f"`{served_model_name}` (GET /v1/models).", param="model", code="model_not_found")
    if request.logit_bias:
        raise APIError(400, "logit_bias: not supported", param="logit_bias", code="not_supported")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")


def include_usage(request: _SamplingFields) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def structured_output(response_format: Optional[ResponseFormat]) -> dict:
    """The SamplingParams keywords `response_format` asks for. Structured output (the grammar-
    constrained sampler) plugs in here: json_object / json_schema become its keywords; until it
    exists they are refused by name rather than silently ignored."""
    if response_format is None or response_format.type == "text":
        return {}
    if response_format.type in ("json_object", "json_schema"):
        raise APIError(400, f"response_format: type {response_format.type!r} is not supported yet "
                            "(structured output is coming); use {\"type\": \"text\"}",
                       param="response_format", code="not_supported")
    raise APIError(400, f"response_format.type: unknown type {response_format.type!r}; expected text, "
                        "json_object or json_schema", param="response_format.type")
