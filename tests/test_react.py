"""Qwen-1 function calling (qwenserve/model/react.py): the ReAct prompt for a fixed tool list,
written out here by hand from the format of Qwen's openai_api.py, and the parse of hand-written
model outputs, well-formed and malformed, whole and split across stream deltas at every
position."""
import json
import random

import pytest

from qwenserve.model.chat_template import render_chat
from qwenserve.model.react import (FunctionSpec, ReactOutputParser, ReactResult, fold_events,
                                   parse_react_output, render_react)

WEATHER = FunctionSpec("get_weather", "Get the current weather in a city.",
                       {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = FunctionSpec("get_time", "Get the local time.", None)

# The instruction for [WEATHER, TIME], typed from the format (not produced by the code under test).
INSTRUCTION = (
    "Answer the following questions as best you can. You have access to the following APIs:\n"
    "\n"
    "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
    "Get the current weather in a city. Parameters: "
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}\n'
    "\n"
    "get_time: Call this tool to interact with the get_time API. What is the get_time API useful for? "
    "Get the local time. Parameters: {}\n"
    "\n"
    "Use the following format:\n"
    "\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [get_weather, get_time]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n"
    "\n"
    "Begin!"
)
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"role": "assistant", "content": "I should look it up.",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}


def chatml(prompt) -> str:
    return render_chat(prompt.messages, system=prompt.system,
                       continue_final_message=prompt.continue_final_message)


def test_first_turn_with_tools():
    prompt = render_react([QUESTION], [WEATHER, TIME])
    assert chatml(prompt) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n" + INSTRUCTION + "\n\nQuestion: What is the weather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert prompt.parser_start == "start"


def test_tool_result_round_trip_continues_the_assistant_turn():
    """The call and its result are written into one open assistant turn ending in "Thought:";
    a system message replaces the default one (both trimmed as Qwen does)."""
    messages = [{"role": "system", "content": "\nBe terse.  "}, QUESTION, CALL, RESULT]
    prompt = render_react(messages, [WEATHER, TIME])
    assert chatml(prompt) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        "<|im_start|>user\n" + INSTRUCTION + "\n\nQuestion: What is the weather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\nThought: I should look it up.\nAction: get_weather\n"
        'Action Input: {"city": "Paris"}\nObservation: {"temperature": 21}\nThought:')
    assert prompt.continue_final_message and prompt.parser_start == "thought"


def test_history_after_tools_legacy_function_roles_and_a_new_question():
    """A finished ReAct turn (call, result, final answer) stays in the history; legacy
    function_call / role function render the same way; the instruction moves to the new
    question."""
    messages = [QUESTION,
                {"role": "assistant", "content": None,
                 "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"role": "function", "name": "get_weather", "content": "21 C"},
                {"role": "assistant", "content": "It is 21 C."},
                {"role": "user", "content": "And the time?"}]
    prompt = render_react(messages, [WEATHER, TIME])
    assert chatml(prompt) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\nThought: \nAction: get_weather\nAction Input: {\"city\": \"Paris\"}\n"
        "Observation: 21 C\nThought: I now know the final answer.\nFinal Answer: It is 21 C.<|im_end|>\n"
        "<|im_start|>user\n" + INSTRUCTION + "\n\nQuestion: And the time?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_two_calls_in_one_message_each_followed_by_its_result():
    two = dict(CALL, tool_calls=CALL["tool_calls"] + [
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}])
    prompt = render_react([QUESTION, two, RESULT, {"role": "tool", "tool_call_id": "call_2", "content": "noon"}],
                          [WEATHER, TIME])
    assert prompt.messages[-1]["content"] == (
        'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        'Observation: {"temperature": 21}\nAction: get_time\nAction Input: {}\nObservation: noon\nThought:')


def test_forced_function_opens_the_call_and_history_without_tools_offered():
    forced = render_react([QUESTION], [WEATHER, TIME], forced_function="get_time")
    assert forced.messages[-1] == {"role": "assistant", "content": "Action: get_time\nAction Input:"}
    assert forced.continue_final_message and forced.parser_start == "arguments"
    assert forced.forced_function == "get_time"
    after_result = render_react([QUESTION, CALL, RESULT], [WEATHER], forced_function="get_weather")
    assert after_result.messages[-1]["content"].endswith('Observation: {"temperature": 21}\n'
                                                         "Action: get_weather\nAction Input:")
    # tool_choice "none": no instruction, but the earlier call and result are still ReAct text.
    plain = render_react([QUESTION, CALL, RESULT], None)
    assert plain.messages[0]["content"] == QUESTION["content"]
    assert plain.messages[1]["content"].endswith("Observation: {\"temperature\": 21}\nThought:")


@pytest.mark.parametrize("messages,error", [
    ([RESULT], r"messages\[0\]\.role: a tool result must follow an assistant message"),
    ([QUESTION, RESULT], r"messages\[1\]\.role: a tool result must follow an assistant message"),
    ([CALL], r"messages\[0\]\.role: an assistant message must follow a user message"),
    ([QUESTION, {"role": "system", "content": "x"}], r"messages\[1\]\.role: a system message is only allowed first"),
    ([QUESTION, {"role": "robot", "content": "x"}], r"messages\[1\]\.role: unknown role 'robot'"),
    ([{"role": "system", "content": "x"}], "messages: needs at least one user message"),
])
def test_render_errors_name_the_message(messages, error):
    with pytest.raises(ValueError, match=error):
        render_react(messages, [WEATHER])


def test_forcing_an_unknown_function_names_tool_choice():
    with pytest.raises(ValueError, match="tool_choice: function 'nope' is not among the tools"):
        render_react([QUESTION], [WEATHER], forced_function="nope")


# ---------------------------------------------------------------- parsing the model's text

def call(name, args, content=None):
    return ReactResult(content, (name, args))


def text(content):
    return ReactResult(content, None)


# (where the text starts, the model's text, what it means)
OUTPUTS = [
    ("start", 'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\n',
     call("get_weather", '{"city": "Paris"}', "I should look it up.")),
    ("start", 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city":\n  "Paris"}  \n\n',
     call("get_weather", '{"city":\n  "Paris"}', "I need the weather.")),
    ("start", "Action: get_time\nAction Input: {}", call("get_time", "{}")),
    ("start", "  Thought:\nAction: get_time\nAction Input:", call("get_time", "")),
    ("start", "Thought: I now know the final answer.\nFinal Answer: It is 21 C in Paris.",
     text("It is 21 C in Paris.")),
    ("start", "Final Answer:  two spaces stay one", text(" two spaces stay one")),
    ("start", "Paris is sunny today.", text("Paris is sunny today.")),
    ("start", "Sure.\nAction: get_time\nAction Input: {}\n", call("get_time", "{}", "Sure.")),
    ("start", "Thought: just thinking, no action", text("just thinking, no action")),
    ("start", "Thou", text("Thou")),
    ("start", "", text(None)),
    # Malformed: not calls, so the text is the content.
    ("start", "Thought: hmm\nAction: get_time\nno input line", text(" hmm\nAction: get_time\nno input line")),
    ("start", "Thought: hmm\nAction: get_time", text(" hmm\nAction: get_time")),
    ("start", "Action: \nAction Input: {}", text("Action: \nAction Input: {}")),
    ("start", "Line one\nAction: x\nAction: get_time\nAction Input: {}",
     call("get_time", "{}", "Line one\nAction: x")),
    ("start", "Thought: a\nAction Input: {}", text("a\nAction Input: {}")),
    ("start", "Answer:\nActions speak louder", text("Answer:\nActions speak louder")),
    # After an Observation the text continues a "Thought:".
    ("thought", " I now know the final answer.\nFinal Answer: 21 C", text("21 C")),
    ("thought", " I also need the time.\nAction: get_time\nAction Input: {}",
     call("get_time", "{}", "I also need the time.")),
    ("thought", " The answer is 21 C.", text("The answer is 21 C.")),
    # A forced call: the text is the arguments.
    ("arguments", ' {"city": "Rome"}\n', call("get_weather", '{"city": "Rome"}')),
    ("arguments", "", call("get_weather", "")),
]


@pytest.mark.parametrize("start,output,expected", OUTPUTS, ids=[repr(o[1][:30]) for o in OUTPUTS])
def test_parse_whole_output(start, output, expected):
    assert parse_react_output(output, start, "get_weather") == expected


def _streamed(start, chunks):
    parser = ReactOutputParser(start, "get_weather")
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
    return events


@pytest.mark.parametrize("start,output,expected", OUTPUTS, ids=[repr(o[1][:30]) for o in OUTPUTS])
def test_parse_split_at_every_position_and_char_by_char(start, output, expected):
    """Two deltas split at every position, one delta per character and random splits all give
    the whole text's result; a call's name comes before any of its arguments, exactly once."""
    splits = [[output[:i], output[i:]] for i in range(len(output) + 1)] + [list(output)]
    rng = random.Random(len(output))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(output) + 1), min(3, len(output) + 1)))
        splits.append([output[a:b] for a, b in zip([0] + cuts, cuts + [len(output)])])
    for chunks in splits:
        events = _streamed(start, chunks)
        assert fold_events(events) == expected, chunks
        kinds = [kind for kind, _ in events]
        assert kinds.count("call") == (expected.call is not None)
        if "arguments" in kinds:
            assert kinds.index("call") < kinds.index("arguments")
            assert "content" not in kinds[kinds.index("call"):]


def test_streaming_holds_back_only_what_may_be_markup():
    """Free text streams at once except a tail that could begin "\\nAction:"; a final answer
    streams as soon as its marker is complete; arguments stream without trailing whitespace."""
    parser = ReactOutputParser()
    assert parser.feed("Hello") == [("content", "Hello")]
    assert parser.feed(" there\nAct") == [("content", " there")]
    assert parser.feed("ually, no.") == [("content", "\nActually, no.")]
    parser = ReactOutputParser()
    assert parser.feed("Thought: I now know") == []
    assert parser.feed(" the final answer.\nFinal Answer: Par") == [("content", "Par")]
    assert parser.feed("is") == [("content", "is")]
    parser = ReactOutputParser()
    assert parser.feed("Thought: look\nAction: get_time\nAction Input: {\"a\"") == [
        ("content", "look"), ("call", "get_time"), ("arguments", '{"a"')]
    assert parser.feed(": 1}\n") == [("arguments", ": 1}")]
    assert parser.finish() == []


def test_parser_arguments_are_checked():
    with pytest.raises(ValueError, match="start"):
        ReactOutputParser("middle")
    with pytest.raises(ValueError, match="function_name"):
        ReactOutputParser("arguments")


@pytest.mark.parametrize("start,output,expected", [
    ("start", "Thought: x\nAction: get_time\nAction Input: {}", text("x\nAction: get_time\nAction Input: {}")),
    ("start", "Action: get_time\nAction Input: {}", text("Action: get_time\nAction Input: {}")),
    ("thought", " I now know the final answer.\nFinal Answer: 21 C", text("21 C")),
    ("start", "Hi\nAction: get_time\nAction Input: {}", text("Hi\nAction: get_time\nAction Input: {}")),
])
def test_without_tools_offered_an_action_is_text_and_a_final_answer_is_unwrapped(start, output, expected):
    """tool_choice "none" with earlier calls in the history: the model may still write ReAct
    text; an Action is then its text, never a call, and streaming never holds it back."""
    assert parse_react_output(output, start, calls=False) == expected
    for i in range(len(output) + 1):
        parser = ReactOutputParser(start, calls=False)
        events = parser.feed(output[:i]) + parser.feed(output[i:]) + parser.finish()
        assert fold_events(events) == expected
    streaming = ReactOutputParser("start", calls=False)
    assert streaming.feed("Hi\nAct") == [("content", "Hi\nAct")]


# ---------------------------------------------------------------- a call the model must make

def grammar_accepts(grammar: str, text: str) -> bool:
    """Whether llguidance, over Qwen-1's vocabulary, takes `text` (as the tokenizer splits it)
    as a whole output of `grammar`: every token allowed and the grammar able to end there."""
    from qwenserve.model.tokenizer import QwenTokenizer
    from qwenserve.structured_output import StructuredOutput
    from qwenserve.structured_output.compiler import GrammarCompiler

    matcher = GrammarCompiler().compile(StructuredOutput(grammar=grammar)).new_matcher()
    return all(matcher.consume_token(t) for t in QwenTokenizer().encode(text)) and matcher.is_accepting()


@pytest.mark.parametrize("start,text,accepted", [
    ("start", 'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city":"Paris"}', True),
    ("start", 'Thought: \nAction: get_time\nAction Input: {}', True),
    ("start", 'Thought: x\nAction: get_time\nAction Input: {"zone":"UTC","dst":false}', True),  # no parameters: any object
    ("thought", ' I now know\nAction: get_time\nAction Input: {}', True),
    ("start", 'Thought: done\nFinal Answer: 21 C', False),             # a call is required
    ("start", 'Action: get_weather\nAction Input: {"city":"Paris"}', False),  # Qwen's format starts with a thought
    ("start", 'Thought: x\nAction: get_news\nAction Input: {}', False),          # not one of the tools
    ("start", 'Thought: x\nAction: get_weather\nAction Input: {}', False),       # "city" is required
    ("start", 'Thought: x\nAction: get_weather\nAction Input: {"city": "Paris"}', False),  # compact JSON
    ("start", 'Thought: x\nAction: get_weather\nAction Input: {"city":"Paris"}\nObservation:', False),
    ("start", "Thought: " + "y" * 257 + '\nAction: get_time\nAction Input: {}', False),  # over MAX_THOUGHT_CHARS
    ("arguments", ' {"city":"Rome"}', True),
    ("arguments", ' {"town":"Rome"}', False),
])
def test_the_call_grammar_takes_exactly_a_call_in_qwens_format(start, text, accepted):
    from qwenserve.model.react import MAX_THOUGHT_CHARS, call_grammar

    assert MAX_THOUGHT_CHARS == 256
    grammar = call_grammar([WEATHER, TIME], start, "get_weather" if start == "arguments" else None)
    assert grammar_accepts(grammar, text) is accepted
    if accepted:  # and what the grammar takes, the parser reads as that call
        result = parse_react_output(text, start, "get_weather" if start == "arguments" else None)
        assert result.call is not None and result.call[0] in ("get_weather", "get_time")
        assert isinstance(json.loads(result.call[1]), dict)


def test_the_call_grammar_checks_its_inputs():
    from qwenserve.model.react import call_grammar

    with pytest.raises(ValueError, match="tool_choice: function 'nope'"):
        call_grammar([WEATHER], "arguments", "nope")
    with pytest.raises(ValueError, match="tools: a call needs at least one function"):
        call_grammar([], "start")
    with pytest.raises(ValueError, match="start: unknown parser state"):
        call_grammar([WEATHER], "direct")
