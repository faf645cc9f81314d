"""The sampler's random draw: one token per row from softmax(logits / T) restricted by top-k,
top-p and min-p, without random numbers over the vocabulary.

The previous draw raced V exponentials per row (`argmax(p / q)`, q ~ Exp(1)): per row and step a
pass of random numbers over all 151,936 ids, the sampler's largest cost. Here a row needs one
uniform per proposal, and passes over the vocabulary are plain arithmetic:

* Rows with 0 < top_k <= TOP_K_CANDIDATES: the k largest logits are the only candidates.
  Temperature, top-p (renormalised over the k) and min-p are applied to them exactly, and the
  token is drawn by inverse CDF over the survivors. No pass over the vocabulary beyond topk.
* Other rows: e = exp((x - max) / T) over the vocabulary (max 1), summed per block of 128 ids.
  A proposal j ~ e is drawn by inverse CDF in two levels (a block by its sum, then an id in it).
  Min-p zeroes e below min_p first (one fused threshold). With top-p the proposal is accepted
  when the mass of the ids strictly more probable than j is below top_p of the total (exactly:
  j is in the nucleus, ties kept, as the mask-based top-p kept them). A rejected j is outside the
  nucleus, and so is everything no more probable than it, so the next proposal is drawn from
  {e > e_j} only: the block sums of that support are the very sums the membership test computed
  (one pass over the row per proposal; most rows need one or two). This is the
  sorting-free rejection scheme of FlashInfer's top-p sampler; each accepted token has exactly
  the probability the masked distribution gives it (a proposal restricted to the kept set is
  proportional to e, and it is kept exactly when it lies there).
  A top-k beyond TOP_K_CANDIDATES, or a k-th logit tied with the (k+1)-th (the tied ids are all
  kept), masks e below the k-th value first.

Random numbers: a row with a seed draws its proposal r at step s (= len(output_token_ids)) from a
counter-based hash of (seed, s, r) (splitmix64), so a seeded request gets the same tokens whatever
else is in the batch, and after a preemption, with no generator state to carry. Rows without a
seed share the sampler's generator: one batched `torch.rand` per proposal round.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Dividing by a near-zero temperature could overflow float32 to inf (and inf - inf = NaN
# in the softmax); at this temperature the draw is an argmax anyway.
MIN_TEMPERATURE = 1e-6
# Top-k rows with k up to this draw among their k candidates (topk cost grows with k).
TOP_K_CANDIDATES = 1024
BLOCK = 128  # ids per block of the two-level inverse CDF


@dataclass
class RowSpec:
    """One row's draw parameters: `seed` None = the shared generator; `step` = tokens already
    generated (the counter of a seeded row)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int | None
    step: int


# ---------------------------------------------------------------- random numbers
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniforms(seeds, steps, draw: int) -> np.ndarray:
    """float64 uniforms in [0, 1), one per (seed, step), for proposal number `draw`: a function of
    those three integers only (splitmix64 chained over them)."""
    with np.errstate(over="ignore"):
        z = _splitmix64(np.asarray(seeds, dtype=np.uint64) & _MASK64)
        z = _splitmix64(z ^ np.asarray(steps, dtype=np.uint64))
        z = _splitmix64(z ^ np.uint64(draw))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Uniforms:
    """Per proposal round: a uniform for each pending row, from its seed or the shared generator."""

    def __init__(self, specs: list[RowSpec], generator: torch.Generator, device: torch.device):
        self.seeded = np.array([s.seed is not None for s in specs])
        self.seeds = np.array([s.seed or 0 for s in specs], dtype=np.uint64)
        self.steps = np.array([s.step for s in specs], dtype=np.uint64)
        self.generator, self.device = generator, device

    def draw(self, rows: np.ndarray, round_: int) -> torch.Tensor:
        """[len(rows)] float64 on the device; `rows` index the specs."""
        u = torch.empty(len(rows), dtype=torch.float64)
        seeded = self.seeded[rows]
        if seeded.any():
            picked = rows[seeded]
            u[torch.from_numpy(np.flatnonzero(seeded))] = torch.from_numpy(
                counter_uniforms(self.seeds[picked], self.steps[picked], round_))
        u = u.to(self.device)
        if not seeded.all():
            shared = torch.from_numpy(np.flatnonzero(~seeded)).to(self.device)
            fresh = torch.rand(len(shared), dtype=torch.float64, device=self.device, generator=self.generator)
            u.index_copy_(0, shared, fresh)
        return u


# ---------------------------------------------------------------- inverse CDF
def _pick(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row of non-negative `weights` [n, m] (float64), the index where the running sum first
    exceeds `target` [n] (in [0, row sum)); never a zero-weight index, also when rounding puts the
    target at or past the end."""
    cum = weights.cumsum(dim=1)
    pos = torch.searchsorted(cum, target.unsqueeze(1), right=True).squeeze(1)
    cols = torch.arange(weights.shape[1], device=weights.device)
    last_positive = torch.where(weights > 0, cols, -1).amax(dim=1)
    return torch.minimum(pos, last_positive).clamp(min=0)


def _block_sums(e: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n, ceil(V / BLOCK)] float64 sums of consecutive ids (e contiguous)."""
    n, vocab = e.shape
    full = vocab // BLOCK
    sums = e.as_strided((n, full, BLOCK), (vocab, BLOCK, 1)).sum(dim=2) if full else e.new_zeros(n, 0)
    if full * BLOCK < vocab:
        sums = torch.cat([sums, e[:, full * BLOCK:].sum(dim=1, keepdim=True)], dim=1)
    return sums.double()


def _support_sums(e: torch.Tensor, rows: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """Block sums of e[rows] over the ids with e > `above` [len(rows)]: on a CPU one fused
    hardshrink per row (x where x > above, else 0: no mask, no select; twice as fast as the
    batched form there), on a GPU one batched select."""
    if e.device.type == "cpu":
        return torch.cat([_block_sums(F.hardshrink(e[r], threshold).unsqueeze(0))
                          for r, threshold in zip(rows.tolist(), above.tolist())])
    part = e.index_select(0, rows)
    return _block_sums(torch.where(part > above.unsqueeze(1), part, 0.0))


def _draw_in_support(e, rows, sums, above, u) -> torch.Tensor:
    """For each of `rows` of e: an id j ~ e restricted to {e > above} (above 0: every id with
    e > 0), given that support's block sums `sums`; two levels of inverse CDF with one uniform."""
    totals = sums.sum(dim=1)
    target = u * totals
    block = _pick(sums, target)
    before = sums.cumsum(dim=1).gather(1, block.unsqueeze(1)).squeeze(1) - sums.gather(1, block.unsqueeze(1)).squeeze(1)
    vocab = e.shape[1]
    ids = block.unsqueeze(1) * BLOCK + torch.arange(BLOCK, device=e.device)
    valid = ids < vocab
    ids = ids.clamp(max=vocab - 1)
    values = e[rows.unsqueeze(1), ids]
    inside = valid & (values > above.unsqueeze(1))  # the test of _support_sums (above >= 0)
    weights = torch.where(inside, values, 0.0).double()
    pos = _pick(weights, (target - before).clamp(min=0.0))
    return ids.gather(1, pos.unsqueeze(1)).squeeze(1)


# ---------------------------------------------------------------- the two paths
def _draw_candidates(x, rows, specs, picks, uniforms, buffers):
    """Draws for the top-k rows `picks` (indexes into `rows`/`specs`) among their k candidates.
    Returns (picks done, their tokens, picks sent on to the full path because the k-th logit is
    tied with the next: every id tied with the k-th is kept, and the candidates may miss some)."""
    device = x.device
    ks = [specs[i].top_k for i in picks]
    width = min(max(ks) + 1, x.shape[1])
    sub = _gather_rows(x, [rows[i] for i in picks], buffers.get("rows", len(picks), x.shape[1], device))
    vals, ids = sub.topk(width, dim=1)
    k_t = torch.tensor(ks, device=device).unsqueeze(1)
    tied = ((k_t < width) & (vals.gather(1, (k_t - 1).clamp(max=width - 1)) ==
                             vals.gather(1, k_t.clamp(max=width - 1)))).squeeze(1).tolist()
    temperature = torch.tensor([max(specs[i].temperature, MIN_TEMPERATURE) for i in picks],
                               device=device).unsqueeze(1)
    cols = torch.arange(width, device=device).unsqueeze(0)
    e = torch.exp((vals - vals[:, :1]) / temperature).masked_fill(cols >= k_t, 0.0).double()
    # Top-p over the k, renormalised, ties with the last kept id kept (the nucleus as a mask of
    # the sorted probabilities would give it); then min-p relative to the largest (e = 1).
    top_p = torch.tensor([specs[i].top_p for i in picks], dtype=torch.float64, device=device).unsqueeze(1)
    probs = e / e.sum(dim=1, keepdim=True)
    mass_before = probs.cumsum(dim=1) - probs
    num_kept = (mass_before < top_p).sum(dim=1, keepdim=True).clamp(min=1)
    keep = (top_p >= 1.0) | (probs >= probs.gather(1, num_kept - 1))
    min_p = torch.tensor([specs[i].min_p for i in picks], dtype=torch.float64, device=device).unsqueeze(1)
    weights = torch.where(keep & (e >= min_p), e, 0.0)
    pos = _pick(weights, uniforms.draw(np.asarray(picks), 0) * weights.sum(dim=1))
    tokens = ids.gather(1, pos.unsqueeze(1)).squeeze(1)
    done = [j for j, t in enumerate(tied) if not t]
    return ([picks[j] for j in done], tokens.index_select(0, torch.tensor(done, dtype=torch.long, device=device)),
            [picks[j] for j, t in enumerate(tied) if t])


def _gather_rows(x, rows, out):
    """x[rows] into `out` (a kept buffer), or x itself when the rows are all of x, in order."""
    if rows == list(range(x.shape[0])):
        return x
    return torch.index_select(x, 0, torch.tensor(rows, device=x.device), out=out)


def _draw_full(x, rows, specs, picks, uniforms, buffers) -> torch.Tensor:
    """The rejection path over the whole vocabulary for `picks`; returns their tokens."""
    device = x.device
    n, vocab = len(picks), x.shape[1]
    e = buffers.get("e", n, vocab, device)
    x_rows = [rows[i] for i in picks]
    source = _gather_rows(x, x_rows, e)  # x itself when every row is drawn here
    temperatures = [max(specs[i].temperature, MIN_TEMPERATURE) for i in picks]
    # e = exp((x - max) / T): the subtraction first, so that the largest is exp(0) = 1 exactly
    # (a fused multiply-add would leave it an ulp off; the draw relies on e <= 1 with equality
    # for the most probable ids).
    torch.sub(source, source.amax(dim=1, keepdim=True), out=e)
    if any(t != 1.0 for t in temperatures):
        e.mul_(1.0 / torch.tensor(temperatures, device=device).unsqueeze(1))
    e.exp_()
    for row, i in enumerate(picks):  # top-k beyond the candidate path, or tied at the k-th: rare
        k = specs[i].top_k
        if 0 < k < vocab:
            logits = x[rows[i]]
            e[row].masked_fill_(logits < logits.topk(k).values[-1], 0.0)
    sums = _block_sums(e)
    top_p = torch.tensor([specs[i].top_p for i in picks], dtype=torch.float64, device=device)
    nucleus_mass = top_p * sums.sum(dim=1)  # top-p's share of the mass before min-p, as before
    if _apply_min_p(e, [specs[i].min_p for i in picks]):
        sums = _block_sums(e)
    has_top_p = top_p < 1.0
    tokens = torch.empty(n, dtype=torch.long, device=device)
    above = torch.zeros(n, dtype=torch.float32, device=device)  # support: e > above
    pending = torch.arange(n, device=device)
    picks_np = np.asarray(picks)
    round_ = 0
    while len(pending):
        u = uniforms.draw(picks_np[pending.cpu().numpy()], round_)
        j = _draw_in_support(e, pending, sums.index_select(0, pending), above.index_select(0, pending), u)
        e_j = e[pending, j]
        # A most probable id (e = 1, exactly: exp(0)) is in every nucleus: no pass needed.
        test = has_top_p.index_select(0, pending) & (e_j < 1.0)
        accepted = ~test
        if bool(test.any()):
            tested = pending[test]
            # One pass: the mass of the ids strictly more probable than j decides whether j is in
            # the nucleus, and those ids are the next proposal's support if it is not.
            greater = _support_sums(e, tested, e_j[test])
            in_nucleus = greater.sum(dim=1) < nucleus_mass.index_select(0, tested)
            accepted[test] = in_nucleus
            sums.index_copy_(0, tested[~in_nucleus], greater[~in_nucleus])
        above.index_copy_(0, pending[~accepted], e_j[~accepted])
        tokens.index_copy_(0, pending[accepted], j[accepted])
        pending = pending[~accepted]
        round_ += 1
    return tokens


def _apply_min_p(e: torch.Tensor, min_ps: list[float]) -> bool:
    """Zeroes, in place, each row's e below its min_p (e is relative to the row's largest, 1, as
    min_p is); returns whether anything was asked. One fused threshold per run of consecutive
    rows with the same min_p (usually one call for the batch)."""
    changed, start = False, 0
    while start < len(min_ps):
        end = start
        while end < len(min_ps) and min_ps[end] == min_ps[start]:
            end += 1
        if min_ps[start] > 0.0:
            # e > (the float32 just below min_p) is e >= min_p, exactly.
            below = float(np.nextafter(np.float32(min_ps[start]), np.float32(0.0)))
            F.threshold(e[start:end], below, 0.0, inplace=True)
            changed = True
        start = end
    return changed


class DrawBuffers:
    """[rows, V] float32 work buffers kept from step to step, by name and device: on a CPU a fresh
    [256, 151936] tensor costs more in page faults than the arithmetic done in it."""

    def __init__(self):
        self._flat: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        flat = self._flat.get(key)
        if flat is None or flat.numel() < rows * cols:
            flat = torch.empty(rows * cols, dtype=torch.float32, device=device)
            self._flat[key] = flat
        return flat[:rows * cols].view(rows, cols)


def draw(x: torch.Tensor, rows: list[int], specs: list[RowSpec], generator: torch.Generator,
         buffers: DrawBuffers) -> torch.Tensor:
    """[len(rows)] token ids: for each row `rows[i]` of the processed logits `x` [B, V] float32
    (not modified), a draw under `specs[i]`."""
    device, vocab = x.device, x.shape[1]
    uniforms = _Uniforms(specs, generator, device)
    tokens = torch.empty(len(rows), dtype=torch.long, device=device)
    by_candidates = [0 < s.top_k <= TOP_K_CANDIDATES and s.top_k < vocab for s in specs]
    full = [i for i, c in enumerate(by_candidates) if not c]
    if any(by_candidates):
        done, drawn, tied = _draw_candidates(x, rows, specs, [i for i, c in enumerate(by_candidates) if c],
                                             uniforms, buffers)
        if done:
            tokens.index_copy_(0, torch.tensor(done, device=device), drawn)
        full = sorted(full + tied)
    if full:
        tokens.index_copy_(0, torch.tensor(full, device=device),
                           _draw_full(x, rows, specs, full, uniforms, buffers))
    return tokens
