"""The step's token bitmask for a batch of sampling states, computed on the host.

This module owns, for one sampling step: creating a row's GrammarMatcher on first use (from
its params, through the process's compile cache), catching every matcher up with its
output tokens, and filling one bitmask row per structured row, on llguidance's parallel
executor when the host has cores to spare (no Python loop over the vocabulary; the loops
here are over rows). Rows without a
structure get all bits set, so one apply covers the batch.

    bitmask [B, MASK_WORDS] int32 (pinned when the logits are on a GPU)
      row i structured:  the grammar's allowed ids ∩ STRUCTURE_VOCABULARY_ROW
                         (end tokens only once finished or failed)
      row i plain:       -1 (every bit)

min_tokens: a structured row short of min_tokens has its banned ids (EOS and stop ids)
cleared from the row unless nothing else would be left. There the structure wins: it is
complete and only its end may follow. The sampler skips its own ban for these rows.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from qwenserve.structured_output.compiler import compile_structured_output
from qwenserve.structured_output.matcher import GrammarMatcher
from qwenserve.structured_output.vocabulary import (
    MASK_WORDS, STRUCTURE_VOCABULARY_ROW, clear_bits, end_tokens_row)

if TYPE_CHECKING:
    from qwenserve.worker.sampler import SamplingState


# llguidance's pool: 80% of the cores, at most 32 (its own default, made explicit so we know
# it). Handing rows to the pool costs a wake-up of its threads (~10-100 us, more on a loaded
# host), so a batch goes to the pool only when there are threads to share it and rows enough
# to pay for that; otherwise this thread consumes and masks row by row (~3 us and ~25 us).
POOL_THREADS = max(1, min(32, int(0.8 * (os.cpu_count() or 1))))
POOL_MIN_ROWS = 8


def _use_pool(num_rows: int) -> bool:
    return POOL_THREADS > 1 and num_rows >= POOL_MIN_ROWS


@functools.lru_cache(maxsize=1)
def _executor():
    """llguidance's thread pool for batch consume and mask fill."""
    from llguidance import LLExecutor

    return LLExecutor(num_threads=POOL_THREADS)


def grammar_matcher(state: SamplingState) -> GrammarMatcher | None:
    """The state's matcher, created on first use; None for a row without a structure."""
    spec = state.params.structured_output
    if spec is None:
        return None
    if state.grammar_matcher is None:
        try:
            state.grammar_matcher = GrammarMatcher(compile_structured_output(spec))
        except ValueError as e:
            state.grammar_matcher = GrammarMatcher.failed(str(e))
    return state.grammar_matcher


def catch_up(matchers: list[GrammarMatcher], states: list[SamplingState]) -> None:
    """Bring each matcher to its state's output tokens; the one-new-token rows (steady
    decoding) are consumed together on llguidance's threads when that pays (`_use_pool`)."""
    single: list[tuple[GrammarMatcher, int]] = []
    for m, s in zip(matchers, states):
        new = m.new_tokens(s.output_token_ids)
        if len(new) == 1 and m.error is None:
            single.append((m, new[0]))
        elif new:
            m.catch_up(s.output_token_ids)
    if not single:
        return
    if _use_pool(len(single)):
        accepted = _executor().consume_token_par([(m.matcher, t) for m, t in single])
    else:
        accepted = [m.matcher.consume_token(t) for m, t in single]
    for (m, token), ok in zip(single, accepted):
        m.advanced(token, ok)


def fill_bitmask(states: list[SamplingState], pin_memory: bool = False) -> torch.Tensor | None:
    """The step's bitmask [len(states), MASK_WORDS] int32 on the host, or None when no row has
    a structure. Call once per sampling step, after the previous step's tokens were appended
    to the states' output_token_ids (the matchers catch up here)."""
    rows = [i for i, s in enumerate(states) if s.params.structured_output is not None]
    if not rows:
        return None
    matchers = [grammar_matcher(states[i]) for i in rows]
    catch_up(matchers, [states[i] for i in rows])

    # Not torch.full: its fill runs on torch's intra-op threads, which on a loaded host cost
    # milliseconds per step (OpenMP barriers against llguidance's pool). llguidance writes every
    # word of a live row; plain rows are set here, failed rows below.
    bitmask = torch.empty((len(states), MASK_WORDS), dtype=torch.int32, pin_memory=pin_memory)
    out = bitmask.numpy()
    if len(rows) < len(states):
        plain = np.ones(len(states), dtype=bool)
        plain[rows] = False
        out[plain] = -1
    live = [(m.matcher, i) for m, i in zip(matchers, rows) if m.error is None]
    if live and _use_pool(len(live)):
        _executor().unsafe_compute_mask_ptr(live, out.ctypes.data, MASK_WORDS * 4, len(states))
    else:
        for matcher, i in live:
            matcher.unsafe_compute_mask_ptr(out[i].ctypes.data, MASK_WORDS * 4)
    if len(rows) == len(states):  # all rows structured (the common case): no gather copies
        np.bitwise_and(out, STRUCTURE_VOCABULARY_ROW, out=out)
        empty = ~out.any(axis=1)
    else:
        idx = np.asarray(rows)
        out[idx] &= STRUCTURE_VOCABULARY_ROW
        empty = ~out[idx].any(axis=1)
    for j in np.flatnonzero(empty):
        # The grammar wants nothing but a special token (one smuggled past the Lark check):
        # fail the row rather than sample from a row of -inf.
        matchers[j].fail("the grammar allows no ordinary token here")
    for j, i in enumerate(rows):
        if matchers[j].error is not None:  # only the end tokens: the request ends now
            out[i] = end_tokens_row()
    _ban_until_min_tokens(out, rows, states)
    return bitmask


def _ban_until_min_tokens(out: np.ndarray, rows: list[int], states: list[SamplingState]) -> None:
    for i in rows:
        s = states[i]
        if len(s.output_token_ids) >= s.params.min_tokens or not s.banned_token_ids:
            continue
        row = out[i].copy()
        clear_bits(row, s.banned_token_ids)
        if row.any():
            out[i] = row
