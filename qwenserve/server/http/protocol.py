"""The OpenAI request bodies the HTTP front end accepts, as pydantic models.

Owns the shape of each request (types only: strict, so `true` is not a count and `"0.5"` not a
number); the values are checked where gRPC's are, by `SamplingParams` and the engine, so the
two front ends cannot disagree. Unknown fields are ignored, as vLLM and OpenAI's SDKs expect.
`validation_error` turns pydantic's complaint into the OpenAI error naming the field.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: Optional[StrictBool] = False


class _SamplingFields(_Body):
    """The fields both completion routes share (OpenAI's, then vLLM's extras)."""
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    n: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    presence_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    logit_bias: Optional[dict[StrictStr, StrictFloat]] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[StrictStr] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[StrictFloat] = None
    repetition_penalty: Optional[StrictFloat] = None
    min_tokens: Optional[StrictInt] = None
    ignore_eos: Optional[StrictBool] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    skip_special_tokens: Optional[StrictBool] = None
    # Structured output: OpenAI's response_format, and vLLM's extras (params.structured_output).
    response_format: Optional["ResponseFormat"] = None
    guided_json: Optional[Union[dict, StrictStr]] = None
    guided_regex: Optional[StrictStr] = None
    guided_grammar: Optional[StrictStr] = None
    guided_choice: Optional[list[StrictStr]] = None
    guided_whitespace_pattern: Optional[StrictStr] = None
    disable_any_whitespace: Optional[StrictBool] = None


class CompletionRequest(_SamplingFields):
    # A string, a list of strings, token ids or a list of token-id lists: checked by the route,
    # which can say which of the four shapes went wrong.
    prompt: Any = None
    logprobs: Optional[StrictInt] = None
    echo: Optional[StrictBool] = False
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None


class FunctionDefinition(_Body):
    name: StrictStr
    description: Optional[StrictStr] = ""
    parameters: Optional[dict] = None


class Tool(_Body):
    type: StrictStr = "function"
    function: FunctionDefinition


class FunctionName(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: StrictStr = "function"
    function: FunctionName


class FunctionCall(_Body):
    name: StrictStr
    arguments: Union[StrictStr, dict] = ""  # a JSON string; some clients send the object


class ToolCall(_Body):
    id: Optional[StrictStr] = None
    type: StrictStr = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(_Body):
    role: StrictStr
    content: Optional[Union[StrictStr, list[ContentPart]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[StrictStr] = None
    function_call: Optional[FunctionCall] = None


class ResponseFormat(_Body):
    type: StrictStr
    # OpenAI's {"name", "description", "schema", "strict"}: only "schema" matters here.
    json_schema: Optional[dict] = None


_SamplingFields.model_rebuild()  # ResponseFormat is defined after the class that names it


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(...)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[StrictStr, NamedToolChoice]] = None
    functions: Optional[list[FunctionDefinition]] = None
    function_call: Optional[Union[StrictStr, FunctionName]] = None
    parallel_tool_calls: Optional[StrictBool] = None


class TokenizeRequest(_Body):
    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    add_generation_prompt: Optional[StrictBool] = True


class DetokenizeRequest(_Body):
    model: Optional[StrictStr] = None
    tokens: list[StrictInt]


# pydantic names the member of a union it tried ("str", "list[str]", ...) in an error's
# location; those are not fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def field_path(loc: tuple) -> Optional[str]:
    """("messages", 0, "content", "str") -> "messages[0].content"."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part.lower() not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path or None


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """The request body as `model`; APIError 400 naming the field otherwise."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}")
    param = field_path(first["loc"])
    return APIError(400, f"{param or 'request body'}: {first['msg']}", param=param)
