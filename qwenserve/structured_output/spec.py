"""StructuredOutput: what a request asks its output to be, checked for shape.

This module owns the request-side spec that `SamplingParams.structured_output` carries: one
of a JSON schema, any JSON object, a regex, a Lark grammar or a list of choices, plus the
whitespace mode of the JSON forms. It checks types, sizes and the one-form rule (ValueError
naming the field, `structured_output.<field>: ...`) and gives the canonical text that the
compiled-grammar cache is keyed by. Whether the grammar compiles is `compiler.py`'s job.

Whitespace (JSON forms only): `disable_any_whitespace=True` (our default) makes JSON compact,
no whitespace between its tokens (`{"a":1,"b":[2,3]}`); False allows any whitespace there, as
vLLM's and llguidance's default does. The name is vLLM's. The default differs from vLLM's on
purpose: where whitespace is free, a model that is unsure (a small or random one, or Qwen-1
before it saw JSON-mode training) can emit newlines until max_tokens and never close the
structure; compact JSON parses the same and costs fewer tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Largest schema, regex, grammar or choice list (as canonical UTF-8 text) a request may bring.
# Real schemas are a few KB; the limit keeps one request from pinning megabytes in the cache
# and from feeding the compiler text it would spend seconds on.
MAX_SPEC_BYTES = 128 * 1024
MAX_CHOICES = 1024

FORMS = ("json_schema", "json_object", "regex", "grammar", "choice")
JSON_FORMS = ("json_schema", "json_object")
ANY_JSON_OBJECT_SCHEMA = '{"type":"object"}'


@dataclass(frozen=True, eq=False)
class StructuredOutput:
    """Exactly one of the forms:

    - `json_schema`: a JSON schema, as a dict or its JSON text; the output is a JSON value
      that validates against it (llguidance's JSON Schema subset; properties come in the
      schema's order).
    - `json_object=True`: any JSON object.
    - `regex`: the whole output matches it (Rust `regex` syntax, anchored at both ends).
    - `grammar`: a Lark grammar (llguidance's dialect), starting at `start`.
    - `choice`: the output is exactly one of these non-empty strings.

    `disable_any_whitespace` applies to the JSON forms; see the module docstring.
    """

    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None  # a list is taken too (stored as a tuple)
    disable_any_whitespace: bool = True
    # Canonical text of the chosen form, fixed at construction (a dict given as json_schema
    # may be changed by its owner later; the compiled grammar must not).
    _source: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_output.json_object: must be a bool, got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_output.disable_any_whitespace: must be a bool, got "
                             f"{self.disable_any_whitespace!r}")
        given = [name for name in FORMS if self._is_set(name)]
        if len(given) != 1:
            raise ValueError("structured_output: give exactly one of " + ", ".join(FORMS)
                             + (f"; got {', '.join(given)}" if given else "; got none"))
        kind = given[0]
        source = getattr(self, f"_{kind}_source")()
        size = len(source.encode("utf-8"))
        if size > MAX_SPEC_BYTES:
            raise ValueError(f"structured_output.{kind}: {size} bytes is over the limit of "
                             f"{MAX_SPEC_BYTES}")
        if kind == "choice":
            object.__setattr__(self, "choice", tuple(self.choice))
        object.__setattr__(self, "_source", source)

    def _is_set(self, name: str) -> bool:
        value = getattr(self, name)
        return value is True if name == "json_object" else value is not None

    # ------------------------------------------------------------------ per form
    def _json_schema_source(self) -> str:
        schema = self.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_output.json_schema: not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("structured_output.json_schema: must be a JSON object (a dict or its "
                             f"JSON text), got {type(schema).__name__}")
        try:  # key order kept: it is the order the properties are generated in
            return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"structured_output.json_schema: not JSON-serializable: {e}") from None

    def _json_object_source(self) -> str:
        return ANY_JSON_OBJECT_SCHEMA

    def _regex_source(self) -> str:
        return _non_empty_str("regex", self.regex)

    def _grammar_source(self) -> str:
        text = _non_empty_str("grammar", self.grammar)
        check_no_special_tokens(text)
        return text

    def _choice_source(self) -> str:
        choices = self.choice
        if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)):
            raise ValueError("structured_output.choice: must be a list of strings, got "
                             f"{type(choices).__name__}")
        if not choices:
            raise ValueError("structured_output.choice: must not be empty")
        if len(choices) > MAX_CHOICES:
            raise ValueError(f"structured_output.choice: {len(choices)} choices is over the limit "
                             f"of {MAX_CHOICES}")
        for c in choices:
            if not isinstance(c, str) or not c:
                raise ValueError(f"structured_output.choice: entries must be non-empty strings, got {c!r}")
        return json.dumps(list(choices), ensure_ascii=False)

    # ------------------------------------------------------------------ derived
    @property
    def kind(self) -> str:
        """Which form this is: one of FORMS."""
        return next(name for name in FORMS if self._is_set(name))

    @property
    def source(self) -> str:
        """The form's canonical text: compact JSON for json_schema and choice, as given else."""
        return self._source

    @property
    def cache_key(self) -> tuple[str, str, bool]:
        """Equal for specs that compile to the same grammar."""
        compact = self.disable_any_whitespace if self.kind in JSON_FORMS else True
        return (self.kind, self._source, compact)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StructuredOutput):
            return NotImplemented
        return self.cache_key == other.cache_key

    def __hash__(self) -> int:
        return hash(self.cache_key)

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema a JSON form's output validates against (None for the others)."""
        kind = self.kind
        return json.loads(self._source) if kind in JSON_FORMS else None


def _non_empty_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"structured_output.{name}: must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"structured_output.{name}: must not be empty")
    return value


def check_no_special_tokens(lark: str) -> None:
    """ValueError when a Lark grammar names a special token (`<|im_end|>`, `<[151644]>`, ...):
    special tokens never appear inside a structure, and an end token inside one would end
    the request early. Scans outside string literals, regex literals and comments."""
    i, n = 0, len(lark)
    while i < n:
        c = lark[i]
        if c == '"' or (c == "/" and lark[i + 1:i + 2] != "/"):
            i = _skip_literal(lark, i, c)
        elif c == "#" or lark.startswith("//", i):
            newline = lark.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif c == "<":
            raise ValueError("structured_output.grammar: special tokens (<...> at offset "
                             f"{i}) are not allowed inside a structure")
        else:
            i += 1


def _skip_literal(text: str, start: int, quote: str) -> int:
    """Index just past the literal opened by `quote` at `start` (backslash escapes honoured)."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == quote:
            return i + 1
        else:
            i += 1
    return len(text)  # unterminated: the compiler reports it
