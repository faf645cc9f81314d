"""No NaN or infinity reaches a caller, and no request can ask for the impossible (issue 11.8):

- repetition_penalty is bounded to [0.01, 100]: at 1e-45 a positive logit divided by it is inf
  and the softmax of that NaN; inside the bounds the sampler's logits and logprobs stay finite
  for any logits a model produces (checked at |logit| up to 1e4, the most a float16 model gives
  is 65504; the tiny model's are below 10);
- stop_token_ids outside the vocabulary (the ids the model can sample) are rejected by the
  engine, which knows the vocabulary (SamplingParams does not);
- min_tokens with every token of the vocabulary a stop id would ban every token: the row's
  logits would all be -inf and the engine emitted a banned token anyway; it is an error at
  request time instead.
"""
import math

import pytest
import torch

from qwenserve import LLM, SamplingParams
from qwenserve.worker.sampler import Sampler, SamplingState

VOCAB_REAL = 151851


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    engine = LLM(model=tiny_checkpoint, device="cpu", dtype="float32", max_model_len=64,
                 kv_cache_memory=8 * 1024 ** 2, seed=0)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("value", [1e-45, 0.0099, 100.01, 1e30])
def test_repetition_penalty_outside_its_bounds_is_rejected(value):
    with pytest.raises(ValueError, match=r"^repetition_penalty must be in \[0\.01, 100\]"):
        SamplingParams(repetition_penalty=value)


def _sample(logits: torch.Tensor, penalty: float):
    params = SamplingParams(temperature=1.0, logprobs=5)
    params.repetition_penalty = penalty  # past validation, to show what the bounds prevent
    states = [SamplingState(params, prompt_token_ids=list(range(0, 2000, 3)), output_token_ids=[7, 8, 9])
              for _ in range(logits.shape[0])]
    return Sampler(vocab_size_real=logits.shape[1], seed=0).sample(logits, states)


def test_the_bounds_keep_logits_and_logprobs_finite():
    g = torch.Generator().manual_seed(0)
    logits = (torch.rand(4, 3000, generator=g) - 0.5) * 2e4  # |logit| up to 1e4, both signs
    assert not all(math.isfinite(lp) for lp in _sample(logits, 1e-45).sampled_logprobs)  # premise
    for penalty in (0.01, 100.0):
        out = _sample(logits, penalty)
        values = out.sampled_logprobs + [lp for row in out.logprobs for _, lp in row]
        assert values and all(math.isfinite(v) for v in values), penalty


def test_stop_token_ids_outside_the_vocabulary_are_rejected(llm):
    for bad in (VOCAB_REAL, 2 ** 32 - 1):
        with pytest.raises(ValueError) as err:
            llm.engine.add_request("bad-stop", prompt="hi", params=SamplingParams(stop_token_ids=[5, bad]))
        assert str(err.value) == f"stop_token_ids: id {bad} is out of range [0, {VOCAB_REAL})"
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["hi"], SamplingParams(max_tokens=2, stop_token_ids=[VOCAB_REAL - 1]), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # the last id of the vocabulary is fine


def test_min_tokens_banning_every_token_is_an_error(llm):
    everything = list(range(VOCAB_REAL))
    with pytest.raises(ValueError) as err:
        llm.engine.add_request("ban-all", prompt="hi", params=SamplingParams(
            min_tokens=1, max_tokens=2, stop_token_ids=everything, ignore_eos=True))
    assert str(err.value).startswith("min_tokens: 1 with every token of the vocabulary a stop token")
    assert not llm.engine.has_unfinished_requests()
    # One token left free: allowed, and that token is what comes out while the ban holds.
    free = 1234
    out = llm.generate(["hi"], SamplingParams(min_tokens=2, max_tokens=2, temperature=1.0, logprobs=0,
                                              stop_token_ids=everything[:free] + everything[free + 1:]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [free, free]
    assert all(math.isfinite(lp) for entry in out.logprobs for lp in dict(entry).values())


def test_min_tokens_banning_every_token_counts_the_end_of_text_the_engine_adds(llm):
    """With ignore_eos off the engine adds the end-of-text id to the stop ids: stop_token_ids
    of every other id then bans the whole vocabulary until min_tokens, which is refused too."""
    eos = llm.engine.tokenizer.eos_token_id
    others = [i for i in range(VOCAB_REAL) if i != eos]
    with pytest.raises(ValueError, match="^min_tokens: 2 with every token of the vocabulary a stop token"):
        llm.engine.add_request("ban-all-but-eos", prompt="hi", params=SamplingParams(
            min_tokens=2, max_tokens=2, stop_token_ids=others))
    assert not llm.engine.has_unfinished_requests()


def test_top_logprobs_leave_out_the_tokens_that_cannot_be_sampled(llm):
    """Two tokens free under a min_tokens ban and logprobs=5: each entry lists only those two,
    every value finite (the -inf of the banned tokens never reaches a caller)."""
    free = [1234, 4321]
    banned = [i for i in range(VOCAB_REAL) if i not in free]
    out = llm.generate(["hi"], SamplingParams(min_tokens=3, max_tokens=3, temperature=1.0, seed=1, logprobs=5,
                                              stop_token_ids=banned, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= set(free) and len(out.logprobs) == 3
    for entry in out.logprobs:
        assert set(dict(entry)) <= set(free) and all(math.isfinite(lp) for lp in dict(entry).values()), entry
