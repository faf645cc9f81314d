"""Tests of the sampler: processing order, filters, reproducibility, logprobs."""

import math

import pytest
import torch

from qwenserve.sampling_params import SamplingParams
from qwenserve.worker.sampler import (
    Sampler,
    SamplingState,
    apply_penalties,
    make_generator,
)

QWEN_V = 151936
QWEN_REAL = 151851


def state(prompt=(), output=(), generator=None, banned=(), **params):
    return SamplingState(SamplingParams(**params), list(prompt), list(output), generator,
                         list(banned))


# ---------------------------------------------------------------- reproducibility


def _run_seeded(batch_size, row, steps=20, V=1000):
    """Sample one seeded request for `steps` steps at `row` of a batch whose other rows
    are a mix of unseeded, differently seeded and greedy requests."""
    target_params = dict(temperature=0.9, top_p=0.95, top_k=200, repetition_penalty=1.1, seed=1234)
    target = state(prompt=[1, 2, 3], generator=make_generator(1234), **target_params)
    sampler = Sampler(vocab_size_real=V - 10, seed=batch_size)  # other rows differ per run
    tokens = []
    for step in range(steps):
        # The target's logits depend only on the step; the others' on the batch too.
        g = torch.Generator().manual_seed(step)
        target_logits = torch.randn(V, generator=g) * 3
        others = torch.Generator().manual_seed(1000 * batch_size + step)
        states, rows = [], []
        for b in range(batch_size):
            if b == row:
                states.append(target)
                rows.append(target_logits)
                continue
            kind = b % 3
            if kind == 0:
                states.append(state(temperature=1.0))
            elif kind == 1:
                states.append(state(temperature=0.5, top_p=0.5,
                                    generator=make_generator(99 + b + step)))
            else:
                states.append(state(temperature=0.0))
            rows.append(torch.randn(V, generator=others) * 3)
        out = sampler.sample(torch.stack(rows), states)
        tok = out.token_ids[row]
        target.output_token_ids.append(tok)
        tokens.append(tok)
    return tokens


def test_seeded_row_reproduces_whatever_the_batch():
    alone = _run_seeded(batch_size=1, row=0)
    in_batch = _run_seeded(batch_size=8, row=5)
    assert alone == in_batch
    assert len(set(alone)) > 1  # really sampled, not a constant


def test_seeded_request_resumes_after_preemption_with_the_same_tokens():
    """A preempted request comes back as a new SamplingState holding its output so far (no
    generator state carried over): its next tokens are the ones it would have drawn anyway."""
    V = 500
    params = dict(temperature=1.0, top_p=0.9, seed=99)
    rows = [torch.randn(V, generator=torch.Generator().manual_seed(s)) for s in range(12)]
    sampler = Sampler(vocab_size_real=V)

    def run(steps, st):
        for step in steps:
            st.output_token_ids.append(sampler.sample(rows[step].unsqueeze(0), [st]).token_ids[0])
        return st.output_token_ids

    straight = run(range(12), state(**params))
    resumed = run(range(6, 12), state(output=run(range(6), state(**params)), **params))
    assert resumed == straight and len(set(straight)) > 3


def test_shared_generator_is_seedable():
    logits = torch.randn(4, 500)
    states = [state() for _ in range(4)]
    a = Sampler(vocab_size_real=500, seed=3).sample(logits, states).token_ids
    b = Sampler(vocab_size_real=500, seed=3).sample(logits, states).token_ids
    assert a == b


# ---------------------------------------------------------------- filters and frequencies

PROBS = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01])
N_DRAWS = 8000


def _draw(params, n=N_DRAWS, seeded=False):
    """n draws from the distribution PROBS (logits = log p) under `params`; seeded: each row
    with its own seed (its draws come from the counter-based hash, not the shared generator)."""
    V = len(PROBS)
    logits = PROBS.log().expand(n, V).contiguous()
    states = [state(**params, **({"seed": 1000 + i} if seeded else {})) for i in range(n)]
    out = Sampler(vocab_size_real=V, seed=0).sample(logits, states)
    return torch.bincount(torch.tensor(out.token_ids), minlength=V)


def _check_frequencies(counts, allowed, weights):
    """All draws in `allowed`; Pearson chi-square against the renormalised `weights`
    below 30 (for <= 7 degrees of freedom, p < 1e-4 of failing by chance)."""
    outside = [i for i in range(len(counts)) if i not in allowed and counts[i] > 0]
    assert not outside, f"sampled tokens outside {allowed}: {outside}"
    n = counts.sum().item()
    w = torch.tensor([weights[i] for i in allowed], dtype=torch.float64)
    expected = w / w.sum() * n
    observed = counts[list(allowed)].double()
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0, f"chi2={chi2:.1f} observed={observed.tolist()} expected={expected.tolist()}"


@pytest.mark.parametrize("seeded", [False, True])
def test_plain_sampling_matches_probabilities(seeded):
    counts = _draw(dict(temperature=1.0), n=4000 if seeded else N_DRAWS, seeded=seeded)
    _check_frequencies(counts, list(range(8)), PROBS.tolist())


def test_top_k():
    counts = _draw(dict(temperature=1.0, top_k=3))
    _check_frequencies(counts, [0, 1, 2], PROBS.tolist())


def test_top_p():
    # Mass before each token: 0, .30, .55, .75 → smallest set reaching 0.7 is {0, 1, 2}.
    _check_frequencies(_draw(dict(top_p=0.7)), [0, 1, 2], PROBS.tolist())
    # Reaching 0.5 needs {0, 1} (0.55).
    _check_frequencies(_draw(dict(top_p=0.5)), [0, 1], PROBS.tolist())
    # Tiny top_p keeps the top token only.
    assert _draw(dict(top_p=1e-3), n=200)[0] == 200


def test_min_p():
    # Threshold 0.3 * 0.30 = 0.09: keeps 0.30, 0.25, 0.20, 0.10.
    _check_frequencies(_draw(dict(min_p=0.3)), [0, 1, 2, 3], PROBS.tolist())


def test_temperature_top_k_top_p_min_p_together():
    # T=2 → weights ∝ sqrt(p); top_k=6 drops ids 6,7; top_p then sees the renormalised
    # tempered distribution; min_p a fraction of the max of that.
    t = PROBS.double().sqrt()[:6]
    p = t / t.sum()
    cum_before = torch.cat([torch.zeros(1, dtype=torch.float64), p.cumsum(0)[:-1]])
    nucleus = [i for i in range(6) if cum_before[i] < 0.8]
    kept = [i for i in nucleus if p[i] >= 0.55 * p[0]]
    counts = _draw(dict(temperature=2.0, top_k=6, top_p=0.8, min_p=0.55))
    _check_frequencies(counts, kept, t.tolist())
    # By hand: p = .239 .218 .195 .138 .123 .087; mass before id 5 is .913 > .8, so the
    # nucleus is ids 0-4; min_p threshold .55 * .239 = .131 then drops id 4 (.123).
    assert nucleus == [0, 1, 2, 3, 4] and kept == [0, 1, 2, 3]


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(6, 300)
    states = [state(temperature=0.0), state(temperature=0.8, top_k=1)] * 3
    out = Sampler(vocab_size_real=300).sample(logits, states)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_temperature_is_finite():
    logits = torch.randn(3, 300) * 50
    out = Sampler(vocab_size_real=300).sample(logits, [state(temperature=1e-30)] * 3)
    assert out.token_ids == logits.argmax(-1).tolist()


# ---------------------------------------------------------------- penalties


def _penalised_by_hand(logits, st):
    """The formulas, element by element."""
    out = logits.clone()
    p = st.params
    for t in set(st.prompt_token_ids + st.output_token_ids):
        v = out[t].item()
        out[t] = v * p.repetition_penalty if v < 0 else v / p.repetition_penalty
    for t in set(st.output_token_ids):
        c = st.output_token_ids.count(t)
        out[t] = out[t] - (p.presence_penalty * 1.0 + p.frequency_penalty * c)
    return out


def _penalty_batch(V=64):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g) * 4
    states = [
        state(prompt=[1, 2, 2, 3], output=[3, 3, 4], repetition_penalty=1.3),
        state(prompt=[5, 6], output=[6, 7, 7, 7], presence_penalty=0.5, frequency_penalty=0.25),
        state(prompt=[8, 9, 10], output=[10, 11, 11], repetition_penalty=0.7,
              presence_penalty=-1.0, frequency_penalty=1.5),
        state(prompt=[1, 2, 3], output=[1, 2]),  # no penalties at all
        state(prompt=[], output=[], repetition_penalty=2.0, frequency_penalty=1.0),
    ]
    return logits, states


def test_apply_penalties_matches_formulas():
    logits, states = _penalty_batch()
    before = logits.clone()
    out = apply_penalties(logits, states)
    assert torch.equal(logits, before), "input must not be modified"
    for i, st in enumerate(states):
        torch.testing.assert_close(out[i], _penalised_by_hand(logits[i], st), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[3], logits[3]) and torch.equal(out[4], logits[4])


def test_repetition_penalty_matches_transformers():
    transformers_lp = pytest.importorskip("transformers.generation.logits_process")
    logits, states = _penalty_batch()
    # Only the repetition penalty: HF has no presence/frequency penalties.
    states = [state(prompt=s.prompt_token_ids, output=s.output_token_ids,
                    repetition_penalty=s.params.repetition_penalty) for s in states]
    out = apply_penalties(logits, states)
    for i, st in enumerate(states):
        ids = torch.tensor([st.prompt_token_ids + st.output_token_ids], dtype=torch.long)
        proc = transformers_lp.RepetitionPenaltyLogitsProcessor(st.params.repetition_penalty)
        expected = proc(ids, logits[i : i + 1].clone())[0] if ids.numel() else logits[i]
        torch.testing.assert_close(out[i], expected, rtol=1e-6, atol=1e-6)


def test_padding_ids_never_sampled():
    logits = torch.randn(4, QWEN_V)
    logits[:, QWEN_REAL:] = 1e4
    states = [state(temperature=0.0), state(temperature=1.0), state(temperature=2.0, top_p=0.99),
              state(temperature=1.0, generator=make_generator(1), logprobs=5)]
    out = Sampler().sample(logits, states)
    assert all(t < QWEN_REAL for t in out.token_ids)
    assert all(t < QWEN_REAL for t, _ in out.logprobs[3])
    # Many draws at a small vocabulary too.
    small = torch.zeros(2000, 12)
    small[:, 8:] = 50.0
    out = Sampler(vocab_size_real=8, seed=0).sample(small, [state()] * 2000)
    assert max(out.token_ids) < 8


def test_min_tokens_bans_eos_until_reached():
    eos, im_end = 9, 7
    logits = torch.zeros(1, 12)
    logits[0, eos] = 100.0
    logits[0, im_end] = 90.0
    sampler = Sampler(vocab_size_real=12)
    for n_out, expected in [(0, None), (2, None), (3, eos)]:
        st = state(output=[1] * n_out, banned=[eos, im_end], min_tokens=3, max_tokens=10,
                   temperature=0.0)
        tok = sampler.sample(logits, [st]).token_ids[0]
        if expected is None:
            assert tok not in (eos, im_end)
        else:
            assert tok == expected
    # Random rows too, many draws.
    sts = [state(banned=[eos, im_end], min_tokens=1) for _ in range(500)]
    toks = sampler.sample(logits.expand(500, 12), sts).token_ids
    assert eos not in toks and im_end not in toks


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_from_processed_logits_before_temperature():
    g = torch.Generator().manual_seed(5)
    V = 500
    logits = torch.randn(4, V, generator=g) * 3
    states = [
        state(prompt=[1, 2], output=[3], repetition_penalty=1.2, temperature=0.5, top_k=5,
              logprobs=5),
        state(logprobs=0, temperature=0.0),
        state(logprobs=None, frequency_penalty=0.5, output=[4, 4]),
        state(logprobs=20, top_p=0.3, output=[1], presence_penalty=1.0),
    ]
    out = Sampler(vocab_size_real=V - 3, seed=0).sample(logits, states)
    # Expected from the formulas by hand, not from process_logits (which sample() itself uses).
    processed = torch.stack([_penalised_by_hand(logits[i], st) for i, st in enumerate(states)])
    processed[:, V - 3:] = float("-inf")
    logp = torch.log_softmax(processed.double(), dim=-1).float()
    for i, st in enumerate(states):
        n = st.params.logprobs
        if n is None:
            assert out.logprobs[i] is None and out.sampled_logprobs[i] is None
            continue
        else:
            vals, ids = logp[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
            assert [t for t, _ in out.logprobs[i]] == ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in out.logprobs[i]]), vals,
                                       rtol=0, atol=1e-6)
        assert math.isclose(out.sampled_logprobs[i], logp[i, out.token_ids[i]].item(),
                            abs_tol=1e-5)


def test_top_k_and_top_p_keep_ties():
    # top_k = 2: the 2nd largest value (2.0) is tied with a 3rd token; both are kept (HF keeps
    # every token tied with the k-th). The candidates path sees the tie and hands the row to the
    # full-vocabulary path.
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]]).expand(3000, 5).contiguous()
    for params in (dict(top_k=2), dict(top_p=0.6)):  # p(3.0) ~ .53 < .6: the nucleus ends on a 2.0
        out = Sampler(vocab_size_real=5, seed=0).sample(x, [state(**params) for _ in range(3000)])
        assert set(out.token_ids) == {0, 2, 3}, params


def _first_argmax(row: torch.Tensor, limit: int) -> int:
    """Index of the largest of row[:limit], the first one on ties, by a Python scan."""
    values = row[:limit].float().tolist()
    return max(range(limit), key=lambda j: (values[j], -j))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_greedy_rows_take_the_first_maximum_of_the_real_vocabulary(dtype):
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(6, QWEN_V, generator=g) * 3).to(dtype)
    logits[:, QWEN_REAL:] = 1e4  # padding ids hold the largest values: never chosen
    logits[1, 100] = logits[1, 2000] = 50.0  # a tie: the first index wins
    logits[2, QWEN_REAL - 1] = 60.0  # the last real id is still eligible
    plain = [state(temperature=0.0) for _ in range(6)]
    out = Sampler().sample(logits, plain)
    assert out.token_ids == [_first_argmax(logits[i], QWEN_REAL) for i in range(6)]
    assert out.token_ids[1] == 100 and out.token_ids[2] == QWEN_REAL - 1
    assert out.logprobs == [None] * 6 and out.sampled_logprobs == [None] * 6
    # The same rows next to one that needs the general path (a penalty) get the same tokens.
    mixed = plain[:5] + [state(temperature=0.0, prompt=[7], repetition_penalty=1.5)]
    assert Sampler().sample(logits, mixed).token_ids[:5] == out.token_ids[:5]


def test_greedy_rows_with_a_ban_or_penalty_in_force_are_not_plain():
    logits = torch.zeros(1, 12)
    logits[0, 9] = 5.0  # eos
    logits[0, 4] = 4.0
    sampler = Sampler(vocab_size_real=12)
    banned = state(temperature=0.0, banned=[9], min_tokens=2, max_tokens=5)
    assert sampler.sample(logits, [banned]).token_ids == [4]
    penalised = state(temperature=0.0, output=[9], presence_penalty=2.0)
    assert sampler.sample(logits, [penalised]).token_ids == [4]
    with_logprobs = state(temperature=0.0, logprobs=1)
    out = sampler.sample(logits, [with_logprobs])
    assert out.token_ids == [9] and out.logprobs[0][0][0] == 9 and out.sampled_logprobs[0] < 0


def test_repetition_penalty_follows_a_growing_output_step_by_step():
    # The sampler keeps each state's context ids as an array it extends with the new output
    # tokens; each step must still penalise exactly prompt + output so far (by hand), also
    # after the output is cut back (a state rebuilt for a resumed request).
    g = torch.Generator().manual_seed(3)
    V = 300
    st = state(prompt=[5, 7, 7, 299], output=[], repetition_penalty=1.7)
    other = state(prompt=[1], output=[], presence_penalty=0.5)  # a row that takes no repetition penalty
    outputs = [[], [11], [11, 250], [11, 250, 5], [11, 250, 5, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
                                                    24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37], [40]]
    for out in outputs:
        st.output_token_ids[:] = out
        logits = torch.randn(2, V, generator=g) * 4
        got = apply_penalties(logits, [st, other])
        torch.testing.assert_close(got[0], _penalised_by_hand(logits[0], st), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], _penalised_by_hand(logits[1], other), rtol=1e-6, atol=1e-6)


def test_logits_rows_must_match_the_states_on_every_path():
    for st in (state(temperature=0.0), state(temperature=1.0)):
        with pytest.raises(ValueError, match=r"logits must be \[B=2, V\]"):
            Sampler().sample(torch.zeros(3, QWEN_V), [st, st])
