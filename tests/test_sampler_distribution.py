"""The sampler's draw (sampling_draw.py) against the distribution of the sampler it replaced
(tests/sampler_reference.py: the old full-vocabulary masks, whose probabilities the old exponential
race sampled exactly), on constructed logits, by Pearson chi-square over many draws.

Threshold: each test's statistic must stay below the chi-square quantile at p = 1e-4 for its
degrees of freedom (Wilson-Hilferty approximation, within ~1% of the exact quantile here): a
correct sampler fails one of these checks about once in 10,000 runs; a wrong nucleus boundary,
temperature or renormalisation moves the statistic far past it (see
test_the_check_sees_a_wrong_distribution). Tokens outside the reference's support must never come.
"""
import math

import numpy as np
import pytest
import torch
from sampler_reference import reference_probs

from qwenserve.sampling_params import SamplingParams
from qwenserve.worker.sampler import Sampler, SamplingState
from qwenserve.worker.sampling_draw import TOP_K_CANDIDATES, counter_uniforms

V = 1500
N = 12000  # draws per configuration
_Z_1E4 = 3.719  # standard normal quantile at 1 - 1e-4


def chi2_threshold(df: int) -> float:
    """Chi-square quantile at 1 - 1e-4 (Wilson-Hilferty)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + _Z_1E4 * math.sqrt(c)) ** 3


def chi_square(tokens: list[int], probs: torch.Tensor, max_bins: int = 20) -> tuple[float, int]:
    """(statistic, degrees of freedom) of the draws against `probs` [V], tokens grouped into up to
    `max_bins` bins of about equal expected count (most probable first), so that no bin expects
    fewer than N / max_bins draws. Asserts that no draw has probability 0."""
    p = probs.double()
    counts = torch.bincount(torch.tensor(tokens), minlength=len(p)).double()
    outside = torch.nonzero((p == 0) & (counts > 0)).flatten().tolist()
    assert not outside, f"drawn with probability 0: {outside[:10]}"
    order = torch.argsort(p, descending=True)
    mass_before = torch.cumsum(p[order], 0) - p[order]
    bins = torch.clamp((mass_before * max_bins).floor().long(), max=max_bins - 1)
    bins = bins[p[order] > 0]
    observed = torch.zeros(max_bins, dtype=torch.float64).index_add_(0, bins, counts[order][p[order] > 0])
    expected = torch.zeros(max_bins, dtype=torch.float64).index_add_(0, bins, p[order][p[order] > 0])
    used = expected > 0
    expected = expected[used] * len(tokens)
    observed = observed[used]
    return float(((observed - expected) ** 2 / expected).sum()), int(used.sum()) - 1


def logits_row(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * {"peaked": 2.0, "flat": 0.5}[kind]
    x[V - 20:] = float("-inf")  # masked ids (padding, a ban) must never come
    return x


def draws(row: torch.Tensor, params: SamplingParams, n: int = N, seeded: bool = False) -> list[int]:
    states = [SamplingState(params if not seeded else SamplingParams(**{**vars(params), "seed": 7 + i}),
                            [], []) for i in range(n)]
    return Sampler(vocab_size_real=V, seed=1).sample(row.expand(n, V).contiguous(), states).token_ids


CONFIGS = {
    # name: (logits kind, params); the comment says which path of sampling_draw.py runs
    "temperature 0.7": ("peaked", dict(temperature=0.7)),  # full vocabulary, no filter
    "temperature 1.5, flat": ("flat", dict(temperature=1.5)),
    "top_p 0.8": ("peaked", dict(top_p=0.8)),  # rejection: nucleus test
    "top_p 0.3, T 1.3, flat": ("flat", dict(temperature=1.3, top_p=0.3)),  # many rejections
    "top_k 50, top_p 0.9, T 0.8": ("peaked", dict(temperature=0.8, top_k=50, top_p=0.9)),  # candidates
    "top_k 30, min_p 0.05": ("peaked", dict(top_k=30, min_p=0.05)),
    "min_p 0.4, flat": ("flat", dict(min_p=0.4)),  # rejection: min-p
    "min_p 0.05, top_p 0.9": ("peaked", dict(min_p=0.05, top_p=0.9)),
    f"top_k {TOP_K_CANDIDATES + 100}, top_p 0.97": ("flat", dict(top_k=TOP_K_CANDIDATES + 100, top_p=0.97)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_draws_follow_the_previous_samplers_distribution(name):
    kind, params = CONFIGS[name]
    params = SamplingParams(**params)
    row = logits_row(kind, seed=len(name))
    expected = reference_probs(row.unsqueeze(0), [params])[0]
    stat, df = chi_square(draws(row, params), expected)
    assert stat < chi2_threshold(df), f"{name}: chi2 = {stat:.1f} for {df} dof (limit {chi2_threshold(df):.1f})"


def test_seeded_rows_follow_the_same_distribution():
    """Each row with its own seed: the counter-based stream, not the shared generator."""
    params = SamplingParams(top_p=0.8, temperature=0.9)
    row = logits_row("peaked", seed=5)
    stat, df = chi_square(draws(row, params, seeded=True), reference_probs(row.unsqueeze(0), [params])[0])
    assert stat < chi2_threshold(df), stat


def test_one_seed_over_many_steps_follows_the_distribution():
    """A single seeded request step after step (step = len(output_token_ids)): its successive
    draws are a sample of the distribution too, not one value repeated or a skewed stream."""
    params = SamplingParams(top_p=0.9, seed=1234)
    row = logits_row("peaked", seed=9)
    steps = 3000
    states = [SamplingState(params, [], [0] * i) for i in range(steps)]
    tokens = Sampler(vocab_size_real=V).sample(row.expand(steps, V).contiguous(), states).token_ids
    stat, df = chi_square(tokens, reference_probs(row.unsqueeze(0), [params])[0], max_bins=10)
    assert stat < chi2_threshold(df), stat


def test_a_tie_at_the_kth_logit_keeps_every_tied_token():
    row = logits_row("peaked", seed=3)
    top = row.topk(12).values
    row[row == top[10]] = top[9]  # the 10th and 11th largest logits are now equal
    params = SamplingParams(top_k=10, top_p=0.99)
    expected = reference_probs(row.unsqueeze(0), [params])[0]
    assert int((expected > 0).sum()) == 11
    stat, df = chi_square(draws(row, params), expected)
    assert stat < chi2_threshold(df), stat


def test_the_check_sees_a_wrong_distribution():
    """The statistic is far above the threshold for a plausible mistake: a nucleus computed at
    top_p 0.85 where 0.8 was asked for, and temperature 1 where 0.9 was."""
    row = logits_row("peaked", seed=11)
    right = SamplingParams(top_p=0.8, temperature=0.9)
    for wrong in (SamplingParams(top_p=0.85, temperature=0.9), SamplingParams(top_p=0.8, temperature=1.0)):
        expected = reference_probs(row.unsqueeze(0), [right])[0]
        tokens = draws(row, wrong)
        try:
            stat, df = chi_square(tokens, expected)
        except AssertionError:  # drew a token outside the right support: also caught
            continue
        assert stat > 2 * chi2_threshold(df), (wrong, stat)


def test_counter_uniforms_are_uniform_and_keyed_by_seed_step_and_draw():
    seeds = np.arange(20000, dtype=np.uint64) * np.uint64(2654435761)
    u = counter_uniforms(seeds, np.full(20000, 5, dtype=np.uint64), 0)
    assert u.dtype == np.float64 and 0.0 <= u.min() and u.max() < 1.0
    counts = np.bincount((u * 20).astype(int), minlength=20)
    stat = float(((counts - 1000.0) ** 2 / 1000.0).sum())
    assert stat < chi2_threshold(19), stat
    # A function of (seed, step, draw) only, and each of them matters.
    again = counter_uniforms(seeds[:5], np.full(5, 5, dtype=np.uint64), 0)
    assert np.array_equal(again, u[:5])
    assert not np.any(counter_uniforms(seeds[:5], np.full(5, 6, dtype=np.uint64), 0) == u[:5])
    assert not np.any(counter_uniforms(seeds[:5], np.full(5, 5, dtype=np.uint64), 1) == u[:5])
    # The largest seeds (SamplingParams allows up to 2**64 - 1) work.
    big = counter_uniforms(np.array([2**64 - 1], dtype=np.uint64), np.array([0], dtype=np.uint64), 0)
    assert 0.0 <= big[0] < 1.0
