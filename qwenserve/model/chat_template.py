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


def render_chat(messages: Sequence[dict], system: str | None = None, add_generation_prompt: bool = True) -> str:
    """The ChatML prompt as a string (special tokens written out by name)."""
    system_prompt, turns = _normalize(messages, system)
    parts = [f"{IM_START}system\n{system_prompt}{IM_END}\n"]
    parts += [f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def encode_chat(
    tokenizer: QwenTokenizer,
    messages: Sequence[dict],
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """ChatML prompt ids, tokenised piecewise exactly like Alibaba's make_context.

    Each turn is im_start + enc(role) + enc("\\n") + enc(content) + im_end + enc("\\n"); role and
    content are encoded separately (not as one string), which is what the model was trained on.
    """
    system_prompt, turns = _normalize(messages, system)
    nl = tokenizer.encode("\n")
    ids: list[int] = []
    for role, content in [("system", system_prompt)] + turns:
        ids += [tokenizer.im_start_id] + tokenizer.encode(role) + nl + tokenizer.encode(content)
        ids += [tokenizer.im_end_id] + nl
    if add_generation_prompt:
        ids += [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
    return ids
