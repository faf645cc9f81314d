"""OpenAI request fields -> the engine's `SamplingParams`, through the path gRPC uses.

Owns the field mapping of both completion routes. The values are not checked here: unset
fields take the checkpoint's generation_config defaults and every value is validated by
`EngineClient.default_params` (`SamplingParams.from_generation_config`), exactly as the gRPC
servicer does, so a value one front end accepts the other accepts too. Also owns the checks of
OpenAI fields that have no engine counterpart yet (they are refused by name, never ignored),
and of the structured-output fields (`response_format`, vLLM's `guided_*`) -> `StructuredOutput`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qwenserve.sampling_params import SamplingParams
from qwenserve.structured_output import StructuredOutput

from .errors import APIError, field_of
from .protocol import _SamplingFields

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


# The request fields that ask for a structure -> the StructuredOutput form each one sets.
_GUIDED_FORMS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar",
                 "guided_choice": "choice"}


@dataclass(frozen=True)
class StructuredRequest:
    """What a request's structured-output fields ask for: the SamplingParams keywords, and the
    aliases that turn the engine's field names in an error message ("structured_output.regex:
    ...") into the request's ("guided_regex: ...")."""
    kwargs: dict
    aliases: dict

    @property
    def wanted(self) -> bool:
        return bool(self.kwargs)


def structured_output(request: _SamplingFields) -> StructuredRequest:
    """The SamplingParams keywords of `response_format` (json_object, json_schema) and vLLM's
    `guided_json` / `guided_regex` / `guided_grammar` / `guided_choice` (at most one of them) and
    `disable_any_whitespace`. The spec is checked and compiled later, with the other params
    (`sampling_params`); here only the shape: 400 naming the field."""
    if request.guided_whitespace_pattern is not None:
        raise APIError(400, "guided_whitespace_pattern: not supported; use disable_any_whitespace (true: "
                            "compact JSON, the default; false: any JSON whitespace)",
                       param="guided_whitespace_pattern", code="not_supported")
    forms: dict[str, tuple[str, object]] = {}  # request field -> (StructuredOutput form, value)
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            forms["response_format"] = ("json_object", True)
        elif response_format.type == "json_schema":
            spec = response_format.json_schema
            if not isinstance(spec, dict) or "schema" not in spec:
                raise APIError(400, "response_format.json_schema: must be an object with a \"schema\" (and "
                                    "optionally \"name\", \"description\", \"strict\")",
                               param="response_format.json_schema")
            forms["response_format.json_schema.schema"] = ("json_schema", spec["schema"])
        else:
            raise APIError(400, f"response_format.type: unknown type {response_format.type!r}; expected text, "
                                "json_object or json_schema", param="response_format.type")
    for field_name, form in _GUIDED_FORMS.items():
        value = getattr(request, field_name)
        if value is not None:
            forms[field_name] = (form, value)
    if len(forms) > 1:
        names = ", ".join(forms)
        raise APIError(400, f"{names}: give at most one structured-output form per request",
                       param=next(iter(forms)))
    if not forms:
        if request.disable_any_whitespace is not None:
            raise APIError(400, "disable_any_whitespace: only applies with response_format json_object / "
                                "json_schema or guided_json", param="disable_any_whitespace")
        return StructuredRequest({}, {})
    field_name, (form, value) = next(iter(forms.items()))
    spec_kwargs = {form: value}
    if request.disable_any_whitespace is not None:
        spec_kwargs["disable_any_whitespace"] = request.disable_any_whitespace
    try:
        structured = StructuredOutput(**spec_kwargs)
    except ValueError as e:
        param, message = field_of(str(e), _aliases(field_name, form))
        raise APIError(400, message, param=param) from e
    return StructuredRequest({"structured_output": structured}, _aliases(field_name, form))


def _aliases(field_name: str, form: str) -> dict:
    return {"structured_output": field_name, f"structured_output.{form}": field_name,
            "structured_output.disable_any_whitespace": "disable_any_whitespace"}
