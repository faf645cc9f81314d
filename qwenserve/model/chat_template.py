"""ChatML prompt construction for Qwen chat models (Alibaba's `make_context`, chatml format).

Owns the messages -> prompt mapping: the rendered string (`render_chat`, for display and
logging) and the token ids the engine actually runs (`encode_chat`). The `<|im_start|>` /
`<|im_end|>` markers are inserted as special ids by this code; roles and contents are encoded
as plain text, so a user typing `<|im_start|>` cannot forge a turn boundary.
"""

from __future__ import annotations

from typing import Any, Sequence

from qwenserve.model.tokenizer import IM_END, IM_START, QwenTokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


def _normalize(messages: Sequence[Any], system: str | None) -> tuple[str, list[tuple[str, str]]]:
    """Validate messages; return (system prompt, [(role, content)...]) without the system turn."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages: must contain at least one message")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"system: expected a string, got {type(system).__name__}")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}].role: a system message is only allowed first")
            if system is not None:
                # Two competing system prompts: refuse rather than silently drop one.
                raise ValueError("system: given both as an argument and as messages[0]")
            system = content
            continue
        turns.append((role, content))
    return (DEFAULT_SYSTEM_PROMPT if system is None else system), turns


def _check_continuation(turns: list[tuple[str, str]], continue_final_message: bool) -> None:
    if continue_final_message and (not turns or turns[-1][0] != "assistant"):
        raise ValueError("messages: continue_final_message needs an assistant message last")


def render_chat(messages: Sequence[dict], system: str | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> str:
    """The ChatML prompt as a string (special tokens written out by name).

    `continue_final_message`: the last message (an assistant's) is left open, without its
    `<|im_end|>`, so that the model continues it (Qwen's function calling resumes its ReAct
    text after an Observation this way); no generation prompt is added then.
    """
    system_prompt, turns = _normalize(messages, system)
    _check_continuation(turns, continue_final_message)
    parts = [f"{IM_START}system\n{system_prompt}{IM_END}\n"]
    parts += [f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns]
    if continue_final_message:
        parts[-1] = parts[-1][:-len(f"{IM_END}\n")]
    elif add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def encode_chat(
    tokenizer: QwenTokenizer,
    messages: Sequence[dict],
    system: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """ChatML prompt ids, tokenised piecewise exactly like Alibaba's make_context.

    Each turn is im_start + enc(role) + enc("\\n") + enc(content) + im_end + enc("\\n"); role and
    content are encoded separately (not as one string), which is what the model was trained on.
    `continue_final_message` leaves the last (assistant) turn open, as in `render_chat`.
    """
    system_prompt, turns = _normalize(messages, system)
    _check_continuation(turns, continue_final_message)
    nl = tokenizer.encode("\n")
    ids: list[int] = []
    for role, content in [("system", system_prompt)] + turns:
        ids += [tokenizer.im_start_id] + tokenizer.encode(role) + nl + tokenizer.encode(content)
        ids += [tokenizer.im_end_id] + nl
    if continue_final_message:
        del ids[-1 - len(nl):]  # the last turn's im_end and newline
    elif add_generation_prompt:
        ids += [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
    return ids
