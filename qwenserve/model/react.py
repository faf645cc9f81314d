"""Qwen-1 function calling: OpenAI tools rendered into Qwen's ReAct prompt, and the model's
ReAct text parsed back into a tool call (pure functions; no server code).

Owns the prompt format Qwen-1-Chat was trained on (the one Qwen's own `openai_api.py` writes)
and its inverse. With tools, the last user turn is prefixed by the instruction

    Answer the following questions as best you can. You have access to the following APIs:

    get_weather: Call this tool to interact with the get_weather API. What is the get_weather
    API useful for? <description> Parameters: <JSON schema>          (one per tool, blank-line separated)

    Use the following format:
    ... Thought / Action / Action Input / Observation ...
    Begin!

    Question: <the user's message>

and the model answers `Thought: ...\\nAction: get_weather\\nAction Input: {"city": "Paris"}`,
stopping at "Observation:" (a stop string the caller adds). An assistant's earlier tool call is
written back the same way, and each tool result becomes `\\nObservation: <result>` inside that
assistant turn; when the conversation ends with a result, the assistant turn is left open with
`\\nThought:` for the model to continue (ChatML `continue_final_message`). A final answer after
tools is written `Thought: I now know the final answer.\\nFinal Answer: <content>`.

Where this differs from Qwen's openai_api.py, on purpose: the instruction goes on the latest
user turn (openai_api.py puts it on the last *earlier* turn when a conversation with history
ends with a new question); several tool calls in one assistant message are written one after
another, each followed by its result; a named `tool_choice` is forced by writing
`Action: <name>\\nAction Input:` into the open assistant turn, so the model writes only the
arguments.

`ReactOutputParser` turns the model's text into events as it streams, holding back only text
that might still turn out to be markup: a `Thought:` until it is known to precede an Action
(its text becomes the message's content) or a `Final Answer:` (dropped: only the answer is
content), and in free text only a tail that could begin `\\nAction:`. Fed the same text in any
chunks, it emits the same content and the same call (tests check every split).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

from qwenserve.model.chat_template import DEFAULT_SYSTEM_PROMPT

# The stop string that ends a ReAct step: the tool's result is the caller's to give.
OBSERVATION_STOP = "Observation:"

TOOL_DESCRIPTION = ("{name}: Call this tool to interact with the {name} API. What is the {name} API "
                    "useful for? {description} Parameters: {parameters}")

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tool_descriptions}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

# The longest thought `call_grammar` lets the model write before a call it must make.
MAX_THOUGHT_CHARS = 256

_THOUGHT, _ACTION, _INPUT, _ANSWER = "Thought:", "Action:", "Action Input:", "Final Answer:"
_NEW_ACTION = "\n" + _ACTION
_NEW_ANSWER = "\n" + _ANSWER


@dataclass(frozen=True)
class FunctionSpec:
    """One callable tool: OpenAI's `function` object (name, description, JSON-schema parameters)."""
    name: str
    description: str = ""
    parameters: Optional[dict] = None


@dataclass(frozen=True)
class ReactPrompt:
    """A conversation rendered for Qwen's ReAct format, ready for the ChatML template."""
    system: str
    messages: list              # [{"role": "user" | "assistant", "content": str}]
    continue_final_message: bool  # the last (assistant) turn is left open for the model
    parser_start: str           # where the model's text starts: "start" | "thought" | "arguments"
    forced_function: Optional[str] = None  # parser_start "arguments": the function being called


def tools_instruction(functions: Sequence[FunctionSpec]) -> str:
    """The instruction that introduces the tools (Qwen's REACT_INSTRUCTION with TOOL_DESC)."""
    descriptions = "\n\n".join(
        TOOL_DESCRIPTION.format(name=f.name, description=f.description,
                                parameters=json.dumps(f.parameters if f.parameters is not None else {},
                                                      ensure_ascii=False))
        for f in functions)
    return REACT_INSTRUCTION.format(tool_descriptions=descriptions,
                                    tool_names=", ".join(f.name for f in functions))


def _clean(text: Optional[str]) -> str:
    # Qwen's openai_api.py trims every message this way before writing it into the prompt.
    return (text or "").lstrip("\n").rstrip()


def _calls_of(message: dict) -> list[tuple[str, str]]:
    """(name, arguments) of an assistant message's tool_calls or legacy function_call."""
    calls = [(c["function"]["name"], c["function"].get("arguments") or "") for c in message.get("tool_calls") or ()]
    if message.get("function_call"):
        calls.append((message["function_call"]["name"], message["function_call"].get("arguments") or ""))
    return calls


def _action(name: str, arguments: str) -> str:
    return f"{_ACTION} {name}\n{_INPUT} {arguments}"


def render_react(messages: Sequence[dict], functions: Optional[Sequence[FunctionSpec]] = None,
                 forced_function: Optional[str] = None) -> ReactPrompt:
    """Renders OpenAI-style messages (roles system, user, assistant with optional
    `tool_calls` / `function_call`, tool and function results) for Qwen's ReAct format.

    `functions`: the tools offered this turn (None or empty: none are, but earlier calls and
    results in the history are still written in ReAct form). `forced_function`: a name from
    `functions` the model must call. ValueError names the offending message.
    """
    functions = list(functions or ())
    if forced_function is not None and forced_function not in {f.name for f in functions}:
        raise ValueError(f"tool_choice: function {forced_function!r} is not among the tools")
    system = DEFAULT_SYSTEM_PROMPT
    turns: list[dict] = []
    pending_calls: list[tuple[str, str]] = []  # calls of the last assistant message without a result yet
    for i, message in enumerate(messages):
        role, content = message["role"], _clean(message.get("content"))
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}].role: a system message is only allowed first")
            system = content
        elif role == "user":
            turns.append({"role": "user", "content": content})
            pending_calls = []
        elif role == "assistant":
            if not turns:
                raise ValueError(f"messages[{i}].role: an assistant message must follow a user message")
            calls = _calls_of(message)
            if calls:
                thought = content if content.startswith(_THOUGHT) else f"{_THOUGHT} {content}"
                text = f"{thought}\n{_action(*calls[0])}"
                pending_calls = calls[1:]
            else:
                text = f"{_THOUGHT} I now know the final answer.\n{_ANSWER} {content}" if functions else content
                pending_calls = []
            if turns[-1]["role"] == "assistant":  # the same ReAct turn goes on after an Observation
                turns[-1]["content"] += "\n" + text
            else:
                turns.append({"role": "assistant", "content": text})
        elif role in ("tool", "function"):
            if not turns or turns[-1]["role"] != "assistant":
                raise ValueError(f"messages[{i}].role: a {role} result must follow an assistant message")
            turns[-1]["content"] += f"\nObservation: {content}"
            if pending_calls:
                turns[-1]["content"] += "\n" + _action(*pending_calls.pop(0))
        else:
            raise ValueError(f"messages[{i}].role: unknown role {role!r}")
    if not turns:
        raise ValueError("messages: needs at least one user message")
    if functions:
        _prefix_last_question(turns, tools_instruction(functions))
    ends_with_result = messages[-1]["role"] in ("tool", "function")
    if forced_function is not None:
        opening = f"{_ACTION} {forced_function}\n{_INPUT}"
        if turns[-1]["role"] == "assistant" and ends_with_result:
            turns[-1]["content"] += "\n" + opening
        else:
            turns.append({"role": "assistant", "content": opening})
        return ReactPrompt(system, turns, True, "arguments", forced_function)
    if ends_with_result:
        turns[-1]["content"] += f"\n{_THOUGHT}"
        return ReactPrompt(system, turns, True, "thought")
    return ReactPrompt(system, turns, False, "start")


def call_grammar(functions: Sequence[FunctionSpec], start: str, forced_function: Optional[str] = None) -> str:
    """The grammar (Lark, llguidance's dialect, for structured output) of the model's text when
    it must call a function: tool_choice "required" or a named function.

    `start` is the prompt's `parser_start`. "arguments" (a named function, whose Action lines
    the prompt already wrote): only that function's arguments. Otherwise a call to one of
    `functions`: a one-line thought of at most MAX_THOUGHT_CHARS characters (after
    "Thought: ", which the prompt wrote already when `start` is "thought"), then "Action:
    <name>" and "Action Input: <arguments>". The arguments are compact JSON valid for that
    function's `parameters` (any object when it has none). After them only the end of the turn
    can follow, so the call ends where Qwen's own would stop at "Observation:"."""
    def arguments(spec: FunctionSpec) -> str:
        schema = dict(spec.parameters) if spec.parameters is not None else {"type": "object"}
        # Compact, as every JSON form of structured output is by default: a random or unsure
        # model could otherwise write whitespace until max_tokens.
        options = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
        schema["x-guidance"] = dict(options, whitespace_flexible=False)
        return "%json " + json.dumps(schema, ensure_ascii=False)

    by_name = {f.name: f for f in functions}
    if start == "arguments":
        if forced_function not in by_name:
            raise ValueError(f"tool_choice: function {forced_function!r} is not among the tools")
        return f'start: " " arguments\narguments: {arguments(by_name[forced_function])}\n'
    if start not in ("start", "thought"):
        raise ValueError(f"start: unknown parser state {start!r}")
    if not functions:
        raise ValueError("tools: a call needs at least one function")
    lines = [f'start: {"" if start == "thought" else json.dumps(_THOUGHT + " ") + " "}THOUGHT "\\n" call',
             f"THOUGHT: /[^\\n]{{0,{MAX_THOUGHT_CHARS}}}/",
             "call: " + " | ".join(f"{json.dumps(f'{_ACTION} {f.name}{chr(10)}{_INPUT} ', ensure_ascii=False)} "
                                   f"arguments_{i}" for i, f in enumerate(functions))]
    lines += [f"arguments_{i}: {arguments(f)}" for i, f in enumerate(functions)]
    return "\n".join(lines) + "\n"


def _prefix_last_question(turns: list[dict], instruction: str) -> None:
    for turn in reversed(turns):
        if turn["role"] == "user":
            turn["content"] = f"{instruction}\n\nQuestion: {turn['content']}"
            return


# ---------------------------------------------------------------- the model's output

@dataclass(frozen=True)
class ReactResult:
    content: Optional[str]          # the answer, or the thought before a call (None when empty)
    call: Optional[tuple]           # (name, arguments) when the text is a call


class ReactOutputParser:
    """Streams a ReAct answer: `feed(text)` and then `finish()` return events, each
    ("content", text), ("call", name) (once, before any arguments) or ("arguments", text).
    With `calls=False` (no tools offered this turn) an Action is plain text; a final answer
    is still unwrapped."""

    def __init__(self, start: str = "start", function_name: Optional[str] = None, calls: bool = True):
        if start not in ("start", "thought", "arguments"):
            raise ValueError(f"start: unknown parser state {start!r}")
        if start == "arguments" and not function_name:
            raise ValueError("function_name: needed when the text starts with the arguments")
        self._calls = calls
        self._state = start
        self._buf = ""
        self._held = ""           # markup consumed but not emitted: given back as text if no call follows
        self._thought: Optional[str] = None
        self._announce = function_name if start == "arguments" else None
        self._drop_space = False  # the one space after "Final Answer:"
        self._arguments_started = False  # leading whitespace of the arguments is dropped
        self.called = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        events: list[tuple[str, str]] = []
        if self._announce:
            events.append(("call", self._announce))
            self._announce, self.called = None, True
        while getattr(self, f"_step_{self._state}")(events, final=False):
            pass
        return _merged(events)

    def finish(self) -> list[tuple[str, str]]:
        events = self.feed("")
        while getattr(self, f"_step_{self._state}")(events, final=True):
            pass
        return _merged(events)

    # Each _step_<state> consumes what it can; True: the state changed, run again.

    def _step_start(self, events, final) -> bool:
        text = self._buf.lstrip()
        markers = ((_THOUGHT, "thought"), (_ANSWER, "answer")) + (((_ACTION, "action"),) if self._calls else ())
        for marker, state in markers:
            if text.startswith(marker):
                self._held = self._buf[:len(self._buf) - len(text) + len(marker)]
                self._buf = text[len(marker):]
                self._state, self._drop_space = state, state == "answer"
                return True
        if not final and any(m.startswith(text) for m, _ in markers):
            return False  # still could be any of them
        self._state = "direct"
        return True

    def _step_thought(self, events, final) -> bool:
        action = self._buf.find(_NEW_ACTION) if self._calls else -1
        answer = self._buf.find(_NEW_ANSWER)
        if action >= 0 and (answer < 0 or action < answer):
            self._thought = self._buf[:action].strip()
            self._held = self._buf[:action + len(_NEW_ACTION)]
            self._buf = self._buf[action + len(_NEW_ACTION):]
            self._state = "action"
            return True
        if answer >= 0:  # the thought before a final answer is not part of the answer
            self._buf = self._buf[answer + len(_NEW_ANSWER):]
            self._state, self._drop_space = "answer", True
            return True
        if final:
            _emit(events, self._buf.strip())
            self._buf, self._state = "", "done"
        return False

    def _step_direct(self, events, final) -> bool:
        action = self._buf.find(_NEW_ACTION) if self._calls else -1
        if action >= 0:
            _emit(events, self._buf[:action])
            self._held, self._thought = _NEW_ACTION, None
            self._buf = self._buf[action + len(_NEW_ACTION):]
            self._state = "action"
            return True
        keep = 0 if final or not self._calls else _partial_suffix(self._buf, _NEW_ACTION)
        _emit(events, self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _step_action(self, events, final) -> bool:
        newline = self._buf.find("\n")
        if newline < 0:
            if final:  # "Action: name" and nothing more: not a call
                _emit(events, self._held + self._buf)
                self._buf, self._state = "", "done"
            return False
        name, rest = self._buf[:newline].strip(), self._buf[newline + 1:]
        if not final and len(rest) < len(_INPUT) and _INPUT.startswith(rest):
            return False
        if name and rest.startswith(_INPUT):
            _emit(events, self._thought or "")
            events.append(("call", name))
            self.called = True
            self._buf, self._held = rest[len(_INPUT):], ""
            self._state = "arguments"
            return True
        # Malformed (no name, or no "Action Input:" on the next line): it was text after all,
        # and the rest may still hold a well-formed action.
        _emit(events, self._held + self._buf[:newline])
        self._buf, self._held, self._state = self._buf[newline:], "", "direct"
        return True

    def _step_arguments(self, events, final) -> bool:
        if not self.called:
            return False
        text = self._buf
        if not self._arguments_started:
            text = text.lstrip()
            if not text:
                self._buf = ""
                return False
            self._arguments_started = True
        body = text.rstrip()  # trailing whitespace is held: the arguments are trimmed at the end
        if body:
            events.append(("arguments", body))
        self._buf = "" if final else text[len(body):]
        return False

    def _step_answer(self, events, final) -> bool:
        if self._drop_space and self._buf:
            self._buf = self._buf[1:] if self._buf[0] == " " else self._buf
            self._drop_space = False
        _emit(events, self._buf)
        self._buf = ""
        return False

    def _step_done(self, events, final) -> bool:
        self._buf = ""
        return False


def _emit(events: list, text: str) -> None:
    if text:
        events.append(("content", text))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _merged(events: list) -> list:
    out: list = []
    for kind, text in events:
        if out and out[-1][0] == kind and kind in ("content", "arguments"):
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def parse_react_output(text: str, start: str = "start", function_name: Optional[str] = None,
                       calls: bool = True) -> ReactResult:
    """The whole of a ReAct answer at once (the same as streaming it through the parser)."""
    parser = ReactOutputParser(start, function_name, calls)
    events = parser.feed(text) + parser.finish()
    return fold_events(events)


def fold_events(events: Sequence[tuple]) -> ReactResult:
    """The result that a list of parser events adds up to."""
    content = "".join(t for kind, t in events if kind == "content")
    names = [t for kind, t in events if kind == "call"]
    call = (names[0], "".join(t for kind, t in events if kind == "arguments")) if names else None
    return ReactResult(content or None, call)
