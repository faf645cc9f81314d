"""The sampler: from a step's last-position logits to one token id per request.

This module owns the logits processing (structured-output mask, padding-id mask,
min_tokens ban, repetition / presence / frequency penalties), the log-probabilities, and
greedy decoding; the random draw (temperature, top-k, top-p, min-p) is `sampling_draw.py`'s.
It runs on rank 0 only and knows
nothing of the scheduler: each row of the batch comes with a `SamplingState`.

Order of operations (Hugging Face LogitsProcessor semantics):

    logits ─► (s) grammar mask (structured rows)          ┐
           ─► (a) ids >= vocab_size_real → -inf          │
           ─► (b) banned ids → -inf while output < min_tokens │ process_logits()
           ─► (c) repetition penalty (prompt + output)   ┐ │
           ─► (d) presence / frequency (output only)     ┘ apply_penalties()
           ─► (e) log_softmax → logprobs (before temperature)
           ─► (f) greedy rows: argmax
           ─► (g) other rows: /temperature, top-k, top-p, min-p, draw (sampling_draw.draw)

(s) comes first so that every later step, greedy, the filters, penalties, seeds and logprobs,
sees only the tokens the structure allows; it lives in qwenserve/structured_output (the
matcher catches up with `output_token_ids` there, never inside the draw).

Reproducibility: a row whose params have a `seed` draws from a counter-based hash of (seed,
len(output_token_ids), proposal number), so a seeded request yields the same tokens whatever
else is in the batch, and again after a preemption. Rows without one share a generator seeded
by `Sampler(seed=...)`. Neither draws random numbers over the vocabulary (sampling_draw.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from qwenserve.sampling_params import SamplingParams
from qwenserve.structured_output.batch import fill_bitmask
from qwenserve.structured_output.logits_mask import apply_bitmask_
from qwenserve.structured_output.matcher import GrammarMatcher
from qwenserve.worker.sampling_draw import DrawBuffers, RowSpec, draw

QWEN_VOCAB_SIZE_REAL = 151851


@dataclass
class SamplingState:
    """What the sampler needs to know about one row. `banned_token_ids` (EOS and the
    stop ids, filled by the engine) are masked while the output is shorter than
    `params.min_tokens`. `generator` is no longer drawn from: a seeded row's random numbers
    are a function of (params.seed, len(output_token_ids)) (see the module docstring); the
    field stays so that callers that set it keep working. `grammar_matcher` (rows with
    `params.structured_output`) is created on the first mask and follows `output_token_ids`;
    a fresh state rebuilds it from them."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    banned_token_ids: list[int] = field(default_factory=list)
    grammar_matcher: GrammarMatcher | None = field(default=None, repr=False, compare=False)
    # prompt + output ids as int64, kept in step with output_token_ids by appending only the
    # new tokens: the repetition penalty reads the whole context every step, and converting
    # thousands of Python ints per request per step would cost milliseconds of host time.
    _context: np.ndarray | None = field(default=None, repr=False, compare=False)
    _context_len: int = field(default=0, repr=False, compare=False)

    def context_ids(self) -> np.ndarray:
        """prompt_token_ids + output_token_ids as an int64 array (a view; do not modify)."""
        num_prompt = len(self.prompt_token_ids)
        total = num_prompt + len(self.output_token_ids)
        if self._context is None or total < self._context_len:  # first call, or the output was cut
            self._context = np.empty(max(16, 2 * total), dtype=np.int64)
            self._context[:num_prompt] = self.prompt_token_ids
            self._context_len = num_prompt
        if total > self._context_len:
            if total > self._context.shape[0]:
                grown = np.empty(2 * total, dtype=np.int64)
                grown[:self._context_len] = self._context[:self._context_len]
                self._context = grown
            self._context[self._context_len:total] = self.output_token_ids[self._context_len - num_prompt:]
            self._context_len = total
        return self._context[:total]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: the top-N (id, logprob) pairs, best first, or None if not requested.
    logprobs: list[list[tuple[int, float]] | None]
    # Per row that asked for logprobs: the sampled token's log-probability (before
    # temperature); None for the others, whose full-vocabulary logsumexp is never computed.
    sampled_logprobs: list[float | None]


@dataclass
class DeviceSamples:
    """A step's samples while they are still on the device (`Sampler.sample_on_device`):
    nothing here has been read by the host, so launching them costs no host sync (the greedy
    path; the random draw's rejection loop reads a flag per round). `to_host()` reads them."""
    token_ids: torch.Tensor                    # [B] int64
    logprob_rows: list[int]                    # rows that asked for logprobs
    top_n: list[int]                           # per such row, its N
    sampled_logprobs: torch.Tensor | None      # [len(logprob_rows)] float32
    top_vals: torch.Tensor | None              # [len(logprob_rows), max N]
    top_ids: torch.Tensor | None

    def to_host(self, token_ids: list[int] | None = None) -> SamplerOutput:
        """The samples as host lists; `token_ids`: their values, when already copied back."""
        num_rows = self.token_ids.shape[0]
        token_ids = self.token_ids.tolist() if token_ids is None else token_ids
        logprobs: list[list[tuple[int, float]] | None] = [None] * num_rows
        sampled_logprobs: list[float | None] = [None] * num_rows
        if self.logprob_rows:
            values = self.sampled_logprobs.tolist()
            top_vals = self.top_vals.tolist() if self.top_vals is not None else None
            top_ids = self.top_ids.tolist() if self.top_ids is not None else None
            for j, (i, n) in enumerate(zip(self.logprob_rows, self.top_n)):
                sampled_logprobs[i] = values[j]
                # A token the step could not sample (masked by a grammar, banned by min_tokens)
                # has logprob -inf: left out, so a row with fewer than N possible tokens gets
                # fewer than N entries, and no infinity reaches a client (JSON has none).
                logprobs[i] = ([(t, v) for t, v in zip(top_ids[j][:n], top_vals[j][:n]) if v != -math.inf]
                               if n and top_ids is not None else [])
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs, sampled_logprobs=sampled_logprobs)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator for `SamplingState.generator`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[len(rows), max_len] int64 of the rows' ids, right-padded with `pad`; ids outside
    [0, pad) are mapped to `pad` too, so that they land in a scratch column."""
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    out[(out < 0) | (out > pad)] = pad
    return torch.from_numpy(out).to(device)


def _row_index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _select_rows(x: torch.Tensor, rows: list[int], idx: torch.Tensor) -> torch.Tensor:
    """x[rows] without copying [B, V] logits when the rows are all of them, in order."""
    return x if len(rows) == x.shape[0] else x.index_select(0, idx)


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Steps (c) and (d) on a copy of `logits` [B, V]; returns the penalised copy.

    (c) repetition penalty (HF): each distinct id of prompt + output once,
        logit < 0 → logit * penalty, else logit / penalty.
    (d) OpenAI: logit -= presence * (count > 0) + frequency * count, counts over the output.
    """
    return _apply_penalties_(logits.clone(), states)


def _needs_penalties(s: SamplingState) -> bool:
    p = s.params
    return p.repetition_penalty != 1.0 or (
        (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and bool(s.output_token_ids))


def _apply_penalties_(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """`apply_penalties` in place on `logits`, which it returns."""
    vocab = logits.shape[1]
    device = logits.device

    contexts = {i: states[i].context_ids() for i, s in enumerate(states)
                if s.params.repetition_penalty != 1.0}
    contexts = {i: ids[(ids >= 0) & (ids < vocab)] for i, ids in contexts.items()}
    rep_rows = [i for i, ids in contexts.items() if ids.size]
    if rep_rows:
        # Only the context's ids are touched: gather their logits, penalise, scatter back. An id
        # seen twice is written twice with the same value (each is computed from the original
        # logit), so it is penalised once, as HF does. Rows are padded with their own first id.
        width = max(contexts[i].size for i in rep_rows)
        ids_np = np.empty((len(rep_rows), width), dtype=np.int64)
        for row, i in enumerate(rep_rows):
            ids_np[row, :contexts[i].size] = contexts[i]
            ids_np[row, contexts[i].size:] = contexts[i][0]
        ids = torch.from_numpy(ids_np).to(device)
        penalty = torch.tensor(
            [states[i].params.repetition_penalty for i in rep_rows], device=device
        ).unsqueeze(1)
        all_rows = len(rep_rows) == logits.shape[0]
        idx = None if all_rows else _row_index(rep_rows, device)
        target = logits if all_rows else logits.index_select(0, idx)
        seen = target.gather(1, ids)
        target.scatter_(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))
        if not all_rows:
            logits.index_copy_(0, idx, target)

    pf_rows = [
        i
        for i, s in enumerate(states)
        if (s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0)
        and s.output_token_ids
    ]
    if pf_rows:
        ids = _padded([states[i].output_token_ids for i in pf_rows], vocab, device)
        counts = torch.zeros(len(pf_rows), vocab + 1, dtype=logits.dtype, device=device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
        counts = counts[:, :vocab]
        presence = torch.tensor(
            [states[i].params.presence_penalty for i in pf_rows], device=device
        ).unsqueeze(1)
        frequency = torch.tensor(
            [states[i].params.frequency_penalty for i in pf_rows], device=device
        ).unsqueeze(1)
        idx = _row_index(pf_rows, device)
        sub = logits.index_select(0, idx)
        sub = sub - (presence * (counts > 0).to(logits.dtype) + frequency * counts)
        logits.index_copy_(0, idx, sub)
    return logits


def process_logits(
    logits: torch.Tensor, states: list[SamplingState], vocab_size_real: int = QWEN_VOCAB_SIZE_REAL,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps (s), (a)-(d): the logits that logprobs and greedy decoding see. Returns a new
    float32 tensor (`out`, a [B, V] float32 buffer, when given); the input is left untouched."""
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [B={len(states)}, V], got {tuple(logits.shape)}")
    # The one copy: everything below is in place.
    logits = logits.to(torch.float32, copy=True) if out is None else out.copy_(logits)
    vocab = logits.shape[1]

    # (s) Structured rows: only what the grammar allows (min_tokens' ban is inside the mask).
    bitmask = fill_bitmask(states, pin_memory=logits.is_cuda)
    if bitmask is not None:
        apply_bitmask_(logits, bitmask)

    # (a) Rows of the embedding beyond the tokenizer's vocabulary are padding.
    if vocab > vocab_size_real:
        logits[:, vocab_size_real:] = float("-inf")

    # (b) One index_put for all rows still short of min_tokens.
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, s in enumerate(states):
        if len(s.output_token_ids) < s.params.min_tokens and s.params.structured_output is None:
            cols = [t for t in s.banned_token_ids if 0 <= t < vocab]
            ban_rows += [i] * len(cols)
            ban_cols += cols
    if ban_rows:
        logits[_row_index(ban_rows, logits.device), _row_index(ban_cols, logits.device)] = float(
            "-inf"
        )

    return _apply_penalties_(logits, states)


def _is_plain_greedy(s: SamplingState) -> bool:
    """Greedy with no logprobs, no penalty, no structure and no min_tokens ban this step."""
    return (s.params.is_greedy and s.params.logprobs is None and not _needs_penalties(s)
            and s.params.structured_output is None
            and not (len(s.output_token_ids) < s.params.min_tokens and s.banned_token_ids))


class Sampler:
    """`Sampler(vocab_size_real, seed)`; `sample(logits [B, V], states) -> SamplerOutput`, or
    `sample_on_device(...) -> DeviceSamples` to read the results back later.

    `seed` seeds the shared generator used by rows whose state has no generator of its own.
    """

    def __init__(self, vocab_size_real: int = QWEN_VOCAB_SIZE_REAL, seed: int | None = None):
        self.vocab_size_real = vocab_size_real
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        self._buffers = DrawBuffers()  # [B, V] work buffers kept between steps

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._shared[device] = gen
        return gen

    def sample(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        """One token per row, read back to the host (`sample_on_device(...).to_host()`)."""
        return self.sample_on_device(logits, states).to_host()

    @torch.no_grad()
    def sample_on_device(self, logits: torch.Tensor, states: list[SamplingState]) -> DeviceSamples:
        """One token per row (and the logprobs asked for), left on the device."""
        if all(_is_plain_greedy(s) for s in states):
            return self._sample_plain_greedy(logits, len(states))
        processed = process_logits(logits, states, self.vocab_size_real,
                                   out=self._buffers.get("processed", *logits.shape, logits.device))
        num_rows = processed.shape[0]
        device = processed.device
        tokens = torch.empty(num_rows, dtype=torch.long, device=device)

        greedy = [i for i, s in enumerate(states) if s.params.is_greedy]
        sampled = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if greedy:
            idx = _row_index(greedy, device)
            tokens.index_copy_(0, idx, _select_rows(processed, greedy, idx).argmax(dim=-1))
        if sampled:
            drawn = self._sample_random(processed, sampled, [states[i] for i in sampled])
            tokens.index_copy_(0, _row_index(sampled, device), drawn)

        logprob_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        top_n = [states[i].params.logprobs for i in logprob_rows]
        sampled_logprobs = top_vals = top_ids = None
        if logprob_rows:
            idx = _row_index(logprob_rows, device)
            logp = _select_rows(processed, logprob_rows, idx).log_softmax(dim=-1)
            sampled_logprobs = logp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1)
            if max(top_n) > 0:
                top_vals, top_ids = logp.topk(min(max(top_n), logp.shape[1]), dim=-1)
        return DeviceSamples(tokens, logprob_rows, top_n, sampled_logprobs, top_vals, top_ids)

    def _sample_plain_greedy(self, logits: torch.Tensor, num_states: int) -> DeviceSamples:
        """Every row greedy, with nothing to mask, penalise or report: the argmax over the real
        vocabulary of the logits as they are. Same tokens as the general path (widening to fp32
        is exact, so the maximum and its first index do not change), without its [B, V] copy."""
        if logits.dim() != 2 or logits.shape[0] != num_states:
            raise ValueError(f"logits must be [B={num_states}, V], got {tuple(logits.shape)}")
        real = logits[:, :self.vocab_size_real] if logits.shape[1] > self.vocab_size_real else logits
        return DeviceSamples(real.argmax(dim=-1), [], [], None, None, None)

    def _sample_random(self, logits: torch.Tensor, rows: list[int],
                       states: list[SamplingState]) -> torch.Tensor:
        """Step (g) for `rows` of the processed logits [B, V]; returns [len(rows)] token ids."""
        specs = [RowSpec(temperature=s.params.temperature, top_k=s.params.top_k, top_p=s.params.top_p,
                         min_p=s.params.min_p, seed=s.params.seed, step=len(s.output_token_ids))
                 for s in states]
        return draw(logits, rows, specs, self._shared_generator(logits.device), self._buffers)
