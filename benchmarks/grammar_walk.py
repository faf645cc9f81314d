"""Random tokens a grammar allows: how the simulated device's sampler draws structured rows.

The simulated sampler (simulated_device.py) draws random tokens instead of running a model.
A structured row must draw a token its mask allows, or its matcher would fail at once and the
benchmark would measure nothing; and the draw must move the matcher through the structure
(keys, strings, numbers, closing brackets) so that each step's mask costs what a real one
does. Per structured row, from the step's real bitmask:

  * with probability STRUCTURAL_P, a random allowed *structural* token (made only of
    `"`, `,`, `:`, `]`, `}`: they close strings, end values and move on to the next key);
  * else a uniformly random allowed token (a few random ids checked against the mask bits);
  * where neither finds one (a forced key, a number's next digit), a random allowed token of
    the row's first non-zero mask word.

All rows at once with numpy, no loop over rows. `AllowedTokenPicker.
seconds` is the time spent here: simulation overhead, host time a real sampler does not
spend (it draws on the device), reported beside the results so it can be subtracted.

`BENCH_STRUCTURES["records"]` is the benchmark's schema: an array of at least 100,000 records
(id, name, email, score, active, tags), which no benchmark output completes, so a structured
request runs to max_tokens as an ignore_eos one does (a structured request ignores
ignore_eos) and the workloads with and without structure have the same shape.
"""
from __future__ import annotations

import functools
import time
from typing import Sequence

import numpy as np

NUM_ORDINARY_TOKENS = 151643  # ids below <|endoftext|>: never a special token
STRUCTURAL_P = 0.3
STRUCTURAL_CHARS = frozenset(b'",:]}')
CANDIDATES = 8  # random ids tried per row before the fallbacks

RECORD = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string"}, "email": {"type": "string"},
    "score": {"type": "number"}, "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["id", "name", "email", "score", "active", "tags"]}
BENCH_STRUCTURES = {"records": {"type": "array", "minItems": 100_000, "items": RECORD}}


@functools.lru_cache(maxsize=1)
def structural_token_ids() -> np.ndarray:
    """Ordinary tokens made only of STRUCTURAL_CHARS (`"`, `",`, `"}`, `]}`, ...: 68 of them)."""
    from qwenserve.model.tokenizer import NUM_RANKS, QwenTokenizer

    tokenizer = QwenTokenizer()
    return np.array([t for t in range(NUM_RANKS) if set(tokenizer.id_to_bytes(t)) <= STRUCTURAL_CHARS],
                    dtype=np.int64)


def _bits(words: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool: bit `ids[i, j]` of mask row `rows[i]` (words: uint32 [B, W])."""
    return ((words[rows, ids >> 5] >> (ids & 31).astype(np.uint32)) & 1).astype(bool)


class AllowedTokenPicker:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.structural = structural_token_ids()
        self.seconds = 0.0

    def pick(self, bitmask: np.ndarray, rows: Sequence[int]) -> list[int]:
        """One allowed token for each of `rows` of the int32 bitmask [B, W] (module docstring)."""
        start = time.perf_counter()
        words = bitmask.view(np.uint32)
        n = len(rows)
        row_index = np.asarray(rows, dtype=np.int64)[:, None]
        structural = np.broadcast_to(self.structural, (n, self.structural.size))
        structural_ok = _bits(words, row_index, structural)
        candidates = self.rng.integers(0, NUM_ORDINARY_TOKENS, (n, CANDIDATES))
        candidate_ok = _bits(words, row_index, candidates)
        structural_pick = self.structural[np.argmax(self.rng.random(structural_ok.shape) * structural_ok, axis=1)]
        candidate_pick = candidates[np.arange(n), np.argmax(candidate_ok, axis=1)]
        has_structural, has_candidate = structural_ok.any(axis=1), candidate_ok.any(axis=1)
        prefer_structural = self.rng.random(n) < STRUCTURAL_P
        out = np.where(has_structural & (prefer_structural | ~has_candidate), structural_pick, candidate_pick)
        rest = np.flatnonzero(~has_structural & ~has_candidate)
        if rest.size:
            out[rest] = self._in_first_allowed_word(words[row_index[rest, 0]])
        self.seconds += time.perf_counter() - start
        return out.tolist()

    def _in_first_allowed_word(self, words: np.ndarray) -> np.ndarray:
        """Per row of `words` [n, W] (each allows something): a random allowed token of its first
        non-zero word (where the random draws found nothing, few tokens are allowed: often one)."""
        word = np.argmax(words != 0, axis=1)
        bits = np.unpackbits(words[np.arange(len(word)), word].view(np.uint8).reshape(-1, 4), axis=1,
                             bitorder="little").astype(bool)
        bit = np.argmax(self.rng.random(bits.shape) * bits, axis=1)
        return 32 * word + bit
