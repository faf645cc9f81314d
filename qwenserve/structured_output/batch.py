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

Early start (`prefetch_bitmask`): the runner knows the rows of the next sampling step, and
their output tokens, as soon as it has read back the previous step's samples, well before it
samples. It starts the fill then, on a helper thread, so that llguidance's work (which
releases the GIL) overlaps the scheduler and the next step's input preparation; the sampler's
`fill_bitmask` takes that result when it is for the same states with the same output tokens,
and otherwise waits for it (no two fills ever touch a matcher at once) and fills afresh.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional

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


def _use_pool(num_rows: int, early: bool = False) -> bool:
    """Whether a batch of rows goes to llguidance's pool. An early fill's masks (on the helper
    thread, off the step's critical path) use it even with one pool thread: one call that
    releases the GIL for the whole batch, where row by row the helper would take the GIL back
    from the scheduler's thread after every row (~25 us of mask per row). Consuming a token is
    ~3 us, too little for that: with one pool thread the hand-off costs more than it saves, so
    `catch_up` passes early=False."""
    return (POOL_THREADS > 1 or early) and num_rows >= POOL_MIN_ROWS


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
    decoding) are consumed together on llguidance's threads when there are threads to share
    them (`_use_pool`), else here."""
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


def _snapshot(states: list[SamplingState], pin_memory: bool) -> tuple:
    """What a fill depends on: which states, their output tokens (count and last), pinned or not."""
    return (tuple(id(s) for s in states),
            tuple((len(s.output_token_ids), s.output_token_ids[-1] if s.output_token_ids else None)
                  for s in states), pin_memory)


class _Prefetch:
    """At most one early fill at a time: its snapshot and its future."""

    def __init__(self):
        self.lock = threading.Lock()
        self.snapshot: Optional[tuple] = None
        self.future: Optional[Future] = None

    def take(self) -> tuple[Optional[tuple], Optional[Future]]:
        with self.lock:
            taken = self.snapshot, self.future
            self.snapshot = self.future = None
        return taken


_prefetch = _Prefetch()


@functools.lru_cache(maxsize=1)
def _fill_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mask-fill")


def prefetch_bitmask(states: list[SamplingState], pin_memory: bool = False) -> bool:
    """Starts `fill_bitmask(states)` on a helper thread, for the sampling step that will pass
    the same states with the same output tokens; returns whether one was started (not when no
    row has a structure). Between this call and that step the caller must not append to the
    states' output tokens (the runner does that only when it reads samples back)."""
    if not any(s.params.structured_output is not None for s in states):
        return False
    _wait_for_prefetch()  # one fill at a time: matchers are not shared between threads
    states = list(states)
    future = _fill_thread().submit(_fill, states, pin_memory, True)
    with _prefetch.lock:
        _prefetch.snapshot, _prefetch.future = _snapshot(states, pin_memory), future
    return True


def _wait_for_prefetch() -> tuple[Optional[tuple], Optional[Future]]:
    snapshot, future = _prefetch.take()
    if future is not None:
        try:
            future.result()
        except Exception:  # noqa: BLE001 - a stale fill's failure; the fresh fill will raise its own
            pass
    return snapshot, future


def fill_bitmask(states: list[SamplingState], pin_memory: bool = False) -> torch.Tensor | None:
    """The step's bitmask [len(states), MASK_WORDS] int32 on the host, or None when no row has
    a structure. Call once per sampling step, after the previous step's tokens were appended
    to the states' output_token_ids (the matchers catch up here). An early fill started by
    `prefetch_bitmask` for these states, as they are now, is used instead of a second one."""
    snapshot, future = _wait_for_prefetch()
    if future is not None and snapshot == _snapshot(states, pin_memory):
        return future.result()
    return _fill(states, pin_memory)


def _fill(states: list[SamplingState], pin_memory: bool, early: bool = False) -> torch.Tensor | None:
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
    if live and _use_pool(len(live), early):
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
