"""A chat request -> the engine's input: the messages, and Qwen's ReAct prompt when tools are
involved.

Owns the OpenAI chat conventions the engine does not know: text content parts, the developer
role (a system message), tools / tool_choice and the legacy functions / function_call, and the
structure that holds a call the model must make (tool_choice "required" or a named function) to
Qwen's ReAct format and the function's parameters. A
conversation without tools goes to the engine as plain ChatML messages, exactly as over gRPC
(same template, same validation, same errors); one that offers tools or carries earlier calls
and results is rendered by `qwenserve.model.react` first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from qwenserve.model.react import FunctionSpec, call_grammar, render_react
from qwenserve.structured_output import StructuredOutput

from .errors import APIError
from .protocol import ChatCompletionRequest, NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    """Which functions the model is offered this turn and how its calls are reported."""
    functions: list = field(default_factory=list)  # [FunctionSpec]; empty: none offered
    forced: Optional[str] = None   # a function the model must call
    style: str = "tools"           # "tools" (tool_calls) | "functions" (legacy function_call)
    required: bool = False         # the model must call one of `functions` ("required")


@dataclass(frozen=True)
class ChatInput:
    engine_kwargs: dict            # messages, system, continue_final_message for generate()
    parser_start: Optional[str]    # None: plain chat; else where the ReAct text starts
    plan: ToolPlan
    # A call the model must make ("required", or a named function), held to its format and its
    # function's parameters by structured output (`react.call_grammar`); None otherwise.
    call_structure: Optional[StructuredOutput] = None


def _specs(definitions, field_name: str) -> list[FunctionSpec]:
    specs, seen = [], set()
    for i, d in enumerate(definitions):
        if not d.name or d.name in seen:
            raise APIError(400, f"{field_name}[{i}]: function name {d.name!r} is empty or repeated",
                           param=f"{field_name}[{i}]")
        if d.name != d.name.strip() or any(c in d.name for c in "\r\n"):
            # The ReAct text names a function on a line of its own ("Action: <name>").
            param = f"{field_name}[{i}].name" if field_name == "functions" else f"{field_name}[{i}].function.name"
            raise APIError(400, f"{param}: a function name cannot hold line breaks or begin or end with "
                                f"whitespace, got {d.name!r}", param=param)
        seen.add(d.name)
        specs.append(FunctionSpec(d.name, d.description or "", d.parameters))
    return specs


def _offered(body: ChatCompletionRequest) -> Optional[tuple]:
    """(function specs, the choice, the style, the choice's field) of the tools or legacy
    functions the request offers; None when it offers none."""
    if body.tools is not None and body.functions is not None:
        raise APIError(400, "functions: give tools or the legacy functions, not both", param="functions")
    if body.tools:
        for i, tool in enumerate(body.tools):
            if tool.type != "function":
                raise APIError(400, f"tools[{i}].type: only 'function' tools are supported", param=f"tools[{i}].type")
        if body.function_call is not None:
            raise APIError(400, "function_call: goes with functions; with tools use tool_choice", param="function_call")
        return _specs([t.function for t in body.tools], "tools"), body.tool_choice, "tools", "tool_choice"
    if body.functions:
        if body.tool_choice is not None:
            raise APIError(400, "tool_choice: goes with tools; with functions use function_call", param="tool_choice")
        return _specs(body.functions, "functions"), body.function_call, "functions", "function_call"
    for name, choice in (("tool_choice", body.tool_choice), ("function_call", body.function_call)):
        if choice not in (None, "none"):
            raise APIError(400, f"{name}: no tools were given", param=name)
    return None


def tool_plan(body: ChatCompletionRequest) -> ToolPlan:
    offered = _offered(body)
    if offered is None:
        return ToolPlan()
    specs, choice, style, name = offered
    if choice is None or choice == "auto":
        return ToolPlan(specs, None, style)
    if choice == "none":
        return ToolPlan([], None, style)
    if choice == "required":
        return ToolPlan(specs, None, style, required=True)
    if isinstance(choice, str):
        raise APIError(400, f"{name}: unknown value {choice!r}; expected 'none', 'auto', 'required' or a named "
                            "function",
                       param=name)
    if isinstance(choice, NamedToolChoice) and choice.type != "function":
        raise APIError(400, f"{name}.type: expected 'function'", param=f"{name}.type")
    forced = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
    if forced not in {s.name for s in specs}:
        raise APIError(400, f"{name}: function {forced!r} is not among the {style}", param=name)
    return ToolPlan(specs, forced, style)


def _arguments(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def normalized_messages(messages: list) -> list[dict]:
    """The messages (protocol.ChatMessage) as plain dicts: text parts joined, developer ->
    system, calls spelled out."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content[{j}].type: only text parts are supported, got "
                                        f"{part.type!r}", param=f"messages[{i}].content[{j}].type")
                texts.append(part.text)
            content = "\n".join(texts)
        role = "system" if m.role == "developer" else m.role
        if content is None and role not in ("assistant",):
            raise APIError(400, f"messages[{i}].content: required for role {m.role!r}", param=f"messages[{i}].content")
        message = {"role": role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                     for c in m.tool_calls]
        if m.function_call:
            message["function_call"] = {"name": m.function_call.name, "arguments": _arguments(m.function_call.arguments)}
        out.append(message)
    return out


def chat_input(body: ChatCompletionRequest) -> ChatInput:
    plan = tool_plan(body)
    messages = normalized_messages(body.messages)
    uses_react = bool(plan.functions) or any(
        m["role"] in ("tool", "function") or m.get("tool_calls") or m.get("function_call") for m in messages)
    if not uses_react:
        plain = [{"role": m["role"], "content": m["content"] or ""} for m in messages]
        return ChatInput({"messages": plain}, None, plan)
    try:
        prompt = render_react(messages, plan.functions, plan.forced)
    except ValueError as e:
        message = str(e)
        param = message.split(":", 1)[0] if message.startswith(("messages", "tool_choice")) else None
        raise APIError(400, message, param=param) from None
    kwargs = {"messages": prompt.messages, "system": prompt.system}
    if prompt.continue_final_message:
        kwargs["continue_final_message"] = True
    call_structure = None
    if plan.required or plan.forced:
        try:
            call_structure = StructuredOutput(grammar=call_grammar(plan.functions, prompt.parser_start, plan.forced))
        except ValueError as e:  # the spec's shape checks, e.g. its size limit (many or huge schemas)
            raise APIError(400, f"{plan.style}: {str(e).split(': ', 1)[-1]}", param=plan.style) from None
    return ChatInput(kwargs, prompt.parser_start, plan, call_structure)


def call_structure_aliases(plan: ToolPlan) -> dict:
    """The engine's names for a call structure's fields in an error -> the request's: a grammar
    that does not compile comes from the functions' parameters."""
    return {"structured_output": plan.style, "structured_output.grammar": plan.style}
