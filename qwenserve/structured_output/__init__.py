"""Structured output: the sampled tokens are masked so the output is a given structure.

A request's `SamplingParams.structured_output` (a `StructuredOutput`: JSON schema, any JSON
object, regex, Lark grammar or choice) is compiled with llguidance over Qwen-1's vocabulary
when the params are validated; at every sampling step each structured row's logits are
masked to the tokens its grammar allows, before any other logits processing.

    spec.py          StructuredOutput: the forms, shape checks, cache key
    vocabulary.py    the process's llguidance tokenizer, end tokens, structure vocabulary
    compiler.py      spec -> CompiledGrammar; bounded LRU cache; size and time limits
    matcher.py       GrammarMatcher: one request's grammar position, from its output tokens
    batch.py         fill_bitmask(states): catch up the matchers, one bit row per request
    logits_mask.py   apply_bitmask_(logits, bitmask): -inf where a bit is 0
    termination.py   which ids finish a structured request; stop strings do not apply

Only `spec` is imported eagerly: `qwenserve.SamplingParams` must stay importable without
torch or llguidance. The rest is loaded on first use of its names here.
"""
from qwenserve.structured_output.spec import StructuredOutput

_LAZY = {
    "END_TOKEN_IDS": "vocabulary", "MASK_WORDS": "vocabulary", "qwen_lltokenizer": "vocabulary",
    "CompiledGrammar": "compiler", "GrammarCompiler": "compiler",
    "compile_structured_output": "compiler", "default_compiler": "compiler",
    "start_compile": "compiler",
    "GrammarMatcher": "matcher",
    "fill_bitmask": "batch", "grammar_matcher": "batch",
    "apply_bitmask_": "logits_mask",
    "stop_token_ids": "termination", "checks_stop_strings": "termination",
    "stops_before_min_tokens": "termination",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"qwenserve.structured_output.{module}"), name)


__all__ = ["StructuredOutput", *_LAZY]
