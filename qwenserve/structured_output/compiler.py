"""Grammar compilation: a StructuredOutput spec -> an llguidance matcher template, cached.

This module owns turning a spec into llguidance's grammar, building it over Qwen-1's
vocabulary, the limits a request's grammar must stay within, and a bounded LRU cache of the
results (failures included, so a bad schema sent again costs nothing). Every failure is a
ValueError naming the field (`structured_output.json_schema: ...`), raised when the request
is validated, never inside a step.

Limits: the spec's size (`spec.MAX_SPEC_BYTES`), llguidance's parser limits (grammar size,
lexer fuel and states; a pathological regex or schema hits them and fails), and wall time: a
compile that takes longer than `time_limit_s` fails with a ValueError, whether the caller
waited for it or found it in the cache later.

Compiles run on a small thread pool (llguidance releases the GIL while it builds), so
`submit` lets a caller start one and go on (e.g. an engine loop that must not block on a new
schema) and `compile` waits for it, up to the time limit.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwenserve.structured_output.spec import ANY_JSON_OBJECT_SCHEMA, StructuredOutput
from qwenserve.structured_output.vocabulary import (
    MASK_WORDS, STRUCTURE_VOCABULARY_ROW, qwen_lltokenizer)

DEFAULT_CACHE_SIZE = 256
DEFAULT_TIME_LIMIT_S = 5.0
_MAX_ERROR_CHARS = 600


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled spec: llguidance's grammar text and a pristine matcher to copy per request."""

    spec: StructuredOutput
    grammar: str
    compile_seconds: float
    template: Any  # llguidance.LLMatcher that never consumes a token

    def new_matcher(self):
        """A fresh llguidance.LLMatcher at the start of the grammar (a cheap copy)."""
        return self.template.deep_copy()


def llguidance_grammar(spec: StructuredOutput) -> str:
    """The llguidance grammar text of a spec (translation only; nothing is checked here)."""
    from llguidance import LLMatcher

    kind = spec.kind
    if kind in ("json_schema", "json_object"):
        schema = spec.source if kind == "json_schema" else ANY_JSON_OBJECT_SCHEMA
        # Overrides win over the schema's own "x-guidance" options: the request's mode holds.
        return LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": not spec.disable_any_whitespace})
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec.regex)
    if kind == "grammar":
        return LLMatcher.grammar_from_lark(spec.grammar)
    # choice: a Lark alternation of string literals (JSON string escapes are Lark's too).
    alternatives = " | ".join(json.dumps(c) for c in spec.choice)
    return LLMatcher.grammar_from_lark(f"start: {alternatives}")


def _error(spec: StructuredOutput, message: str) -> ValueError:
    message = " ".join(message.split())
    if len(message) > _MAX_ERROR_CHARS:
        message = message[:_MAX_ERROR_CHARS] + " ..."
    return ValueError(f"structured_output.{spec.kind}: {message}")


def _matcher_error(matcher) -> str:
    error = matcher.get_error()
    # llguidance stops with "NoExtension..." when not even a first byte is possible.
    if matcher.stop_reason().startswith("NoExtension") or error.startswith("NoExtension"):
        return "no output can satisfy it"
    return error


class GrammarCompiler:
    """Compiles specs over Qwen-1's vocabulary, at most `time_limit_s` each, keeping the last
    `cache_size` results (by `spec.cache_key`). Thread-safe."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE,
                 time_limit_s: float = DEFAULT_TIME_LIMIT_S, max_workers: int = 2):
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        if not time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
        self.cache_size = cache_size
        self.time_limit_s = time_limit_s
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self.hits = 0
        self.misses = 0

    def submit(self, spec: StructuredOutput) -> Future:
        """A Future of the CompiledGrammar (or of its ValueError); starts the compile on a
        cache miss, returns the cached one (maybe still running) on a hit."""
        if not isinstance(spec, StructuredOutput):
            raise ValueError(f"structured_output: expected a StructuredOutput, got {type(spec).__name__}")
        key = spec.cache_key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return future
            self.misses += 1
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The CompiledGrammar of `spec`; ValueError naming the field if it does not compile
        or takes longer than the time limit."""
        qwen_lltokenizer()  # the first call builds it (~1 s): not part of any grammar's time
        future = self.submit(spec)
        # The compile reports its own overrun; the margin covers a queue behind the pool.
        waited = 2 * self.time_limit_s + 1.0
        try:
            return future.result(timeout=waited)
        except FutureTimeout:
            raise _error(spec, f"compiling took over {waited:g} s, over the limit of "
                               f"{self.time_limit_s:g} s; simplify the schema or grammar") from None

    def _compile(self, spec: StructuredOutput) -> CompiledGrammar:
        from llguidance import LLMatcher, LLParserLimits

        tokenizer = qwen_lltokenizer()  # built once per process; not the grammar's time
        start = time.perf_counter()
        try:
            grammar = llguidance_grammar(spec)
        except ValueError as e:
            raise _error(spec, str(e)) from None
        # Short errors: the request's own grammar is not echoed back into the message.
        template = LLMatcher(tokenizer, grammar, log_level=0,
                             limits=LLParserLimits(verbose_errors=False))
        if template.is_error():
            raise _error(spec, _matcher_error(template))
        # The first mask tells an empty language (e.g. the regex [^\s\S]) from a real one, and
        # runs the lexer once, so pathological lexers fail here rather than in a step.
        first = np.zeros(MASK_WORDS, dtype=np.int32)
        probe = template.deep_copy()
        probe.unsafe_compute_mask_ptr(first.ctypes.data, first.nbytes)
        if probe.is_error():
            raise _error(spec, _matcher_error(probe))
        if not np.bitwise_and(first, STRUCTURE_VOCABULARY_ROW).any():
            raise _error(spec, "no output can satisfy it")
        seconds = time.perf_counter() - start
        if seconds > self.time_limit_s:
            raise _error(spec, f"compiling took {seconds:.1f} s, over the limit of "
                               f"{self.time_limit_s:g} s; simplify the schema or grammar")
        return CompiledGrammar(spec=spec, grammar=grammar, compile_seconds=seconds, template=template)

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._cache), "max_size": self.cache_size,
                    "hits": self.hits, "misses": self.misses}


_default: GrammarCompiler | None = None
_default_lock = threading.Lock()


def default_compiler() -> GrammarCompiler:
    """The process's compiler (one tokenizer, one cache)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = GrammarCompiler()
        return _default


def compile_structured_output(spec: StructuredOutput) -> CompiledGrammar:
    """`default_compiler().compile(spec)`: what request validation calls."""
    return default_compiler().compile(spec)


def start_compile(spec: StructuredOutput) -> None:
    """Starts compiling `spec` on the process's compiler if it is not cached, without waiting
    (a step that will need the grammar soon; its failure is found when the grammar is used)."""
    default_compiler().submit(spec)
