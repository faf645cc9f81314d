"""SamplingParams: the per-request decoding options of the public API.

This module owns the `SamplingParams` dataclass, its validation (every invalid value
raises `ValueError` whose message starts with the field's name) and its construction
from a Qwen `generation_config.json`. It does no sampling itself: that is
`qwenserve/worker/sampler.py`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from qwenserve.structured_output.spec import StructuredOutput

MAX_LOGPROBS = 20
# Completions per request (OpenAI's limit). Each is its own scheduler request, so an unbounded
# n would let one call fill the waiting queue and the KV cache.
MAX_N = 128
_SEED_LIMIT = 2**64
# A logit is divided (if positive) or multiplied (if negative) by the penalty: outside these
# bounds a float32 logit can overflow to inf, and a softmax over inf is NaN (1e-45 did).
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True as a token count is a caller's bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_float(name: str, value: Any) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_int(name: str, value: Any) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


@dataclass
class SamplingParams:
    """How to decode one request. Defaults mirror vLLM's; `temperature=0` is greedy.

    `max_tokens=None` means "as many as fit in max_model_len"; the engine resolves it.
    `top_k=0` (or -1, normalised to 0) and `top_p=1` switch those filters off.
    `logprobs=N` returns, for each generated token, the top-N (id, log-probability) pairs
    (best first) followed by the sampled token's pair when it is not among them, as vLLM
    does (N=0: only the sampled token's pair). Log-probabilities are of the logits after
    penalties and bans, before temperature and the top-k/top-p/min-p filters. Tokens a ban or a
    grammar rules out (log-probability -inf) are never listed, so fewer than N can come back.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self.n = _check_int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")

        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

        self.top_k = _check_int("top_k", self.top_k)
        if self.top_k == -1:  # vLLM's spelling of "off"
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}")

        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                             f"{MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)

        if self.max_tokens is not None:
            self.max_tokens = _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 (or None), got {self.max_tokens}")

        self.min_tokens = _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

        self.stop = self._check_stop(self.stop)
        self.stop_token_ids = self._check_stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _check_bool("skip_special_tokens", self.skip_special_tokens)

        if self.seed is not None:
            self.seed = _check_int("seed", self.seed)
            if not 0 <= self.seed < _SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

        if self.logprobs is not None:
            self.logprobs = _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise ValueError("structured_output must be a qwenserve.StructuredOutput, got "
                                 f"{type(self.structured_output).__name__}")
            # Compiled now (llguidance, cached per process) so a grammar that cannot be built
            # fails the request here, never inside a sampling step.
            from qwenserve.structured_output.compiler import compile_structured_output

            compile_structured_output(self.structured_output)

    @staticmethod
    def _check_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
        return list(stop)

    @staticmethod
    def _check_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
        for i in ids:
            if not _is_int(i) or i < 0:
                raise ValueError(f"stop_token_ids must contain non-negative integers, got {i!r}")
        return [int(i) for i in ids]

    @property
    def is_greedy(self) -> bool:
        """True when decoding is deterministic: argmax of the processed logits."""
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_generation_config(cls, gen_cfg: dict, **overrides: Any) -> SamplingParams:
        """Start from a Hugging Face / Qwen `generation_config.json` dict, then apply the
        `overrides` that are not None (unknown names raise TypeError, as a call would).

        Mapped keys: temperature, top_p, top_k, min_p, repetition_penalty,
        max_new_tokens -> max_tokens, min_new_tokens -> min_tokens, `do_sample: false` ->
        temperature 0, `stop_words_ids: [[id], ...]` -> stop_token_ids. Multi-token entries
        of stop_words_ids cannot be expressed as stop ids and are skipped (Qwen's are all
        single ids). eos_token_id is not a sampling option: the engine reads it itself.
        """
        kwargs: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if gen_cfg.get(key) is not None:
                kwargs[key] = gen_cfg[key]
        if gen_cfg.get("max_new_tokens") is not None:
            kwargs["max_tokens"] = gen_cfg["max_new_tokens"]
        if gen_cfg.get("min_new_tokens") is not None:
            kwargs["min_tokens"] = gen_cfg["min_new_tokens"]
        if gen_cfg.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        stop_ids = [
            ids[0]
            for ids in gen_cfg.get("stop_words_ids") or []
            if isinstance(ids, (list, tuple)) and len(ids) == 1
        ]
        if stop_ids:
            kwargs["stop_token_ids"] = stop_ids
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)
