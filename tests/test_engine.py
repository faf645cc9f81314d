"""The engine against the no-cache reference: greedy outputs token for token in every
scheduling regime (batching, preemption, chunked prefill, prefix caching on and off, dynamic
NTK), logprobs, penalties, no leaked blocks, aborts, stop conditions, max_model_len and seeded
sampling."""
import json
import os
import shutil
from collections import Counter

import pytest
import torch

from qwenserve import LLM, SamplingParams
from qwenserve.model.reference import dense_inputs, reference_greedy

MAX_TOKENS = 8
VOCAB_REAL = 151851  # Qwen's tokenizer size: embedding rows from here on are padding, never sampled
LENGTHS = [1, 7, 16, 17, 45, 128, 200, 300, 33]


def _prompts(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(0, 151643, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ntk_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with seq_length 64, so prompts up to 300 tokens use NTK alphas 1..15 and logn."""
    path = tmp_path_factory.mktemp("ntk") / "model"
    shutil.copytree(tiny_checkpoint, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["seq_length"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def _reference_model(path):
    import torch as t

    from qwenserve.kernels import get_ops
    from qwenserve.model.config import QwenConfig
    from qwenserve.model.loader import load_weights
    from qwenserve.model.qwen import QWenLMHeadModel

    model = QWenLMHeadModel(QwenConfig.from_dir(path), get_ops(False), t.float32)
    load_weights(model, path)
    return model


_REFERENCE_CACHE = {}


def _reference(path):
    if path not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[path] = (_reference_model(path), {})
    return _REFERENCE_CACHE[path]


@torch.inference_mode()
def _reference_logits(model, tokens, rows, alpha):
    """The no-cache reference's float32 logits at positions `rows` (an index of the
    sequence) of `tokens`, NTK alpha fixed, padding ids masked to -inf."""
    ids, positions, meta = dense_inputs(model.config, [tokens], [alpha])
    logits = model.compute_logits(model(ids, positions, meta)[rows]).clone()
    logits[:, VOCAB_REAL:] = float("-inf")
    return logits


def _expected(path, prompts, max_tokens=MAX_TOKENS):
    model, memo = _reference(path)
    out = []
    for p in prompts:
        key = (tuple(p), max_tokens)
        if key not in memo:
            memo[key] = reference_greedy(model, p, max_tokens)
        out.append(memo[key])
    return out


def _greedy(llm, prompts, max_tokens=MAX_TOKENS):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _record_steps(llm):
    """Records, per engine step, what the scheduler handed the workers: the total number of
    tokens scheduled, and for each request scheduled from scratch (or resumed after a
    preemption) (request_id, tokens it had, tokens already computed, tokens scheduled now).
    Summarised when the step is made: `NewRequestData` aliases the live request's token lists."""
    steps = []
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        steps.append((out.total_num_scheduled_tokens,
                      [(r.request_id, len(r.prompt_token_ids) + len(r.output_token_ids),
                        r.num_computed_tokens, out.num_scheduled_tokens[r.request_id])
                       for r in out.new_requests]))
        return out

    scheduler.schedule = recording_schedule
    return steps


def _assert_chunked(llm, steps):
    """No step went over the configured token budget, and at least one prompt was split across
    steps (scheduled with fewer tokens than it still had to compute). Returns the split ids."""
    budget = llm.engine.config.max_num_batched_tokens
    most = max(total for total, _ in steps)
    assert most <= budget, f"a step scheduled {most} tokens, over max_num_batched_tokens={budget}"
    split = {rid for _, new in steps for rid, known, computed, n in new if computed + n < known}
    assert split, "no prompt was chunked: the budget was meant to be smaller than a prompt"
    return split


def _assert_no_leak(llm):
    stats = llm.get_stats()
    assert stats["num_used_blocks"] == 0, stats
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


SETTINGS = {
    "default": dict(),
    "preemption": dict(num_kv_blocks=24, max_num_batched_tokens=256),
    "chunked_prefill": dict(max_num_batched_tokens=64),
    "prefix_caching_off": dict(enable_prefix_caching=False),
    "tiny_blocks_chunked_and_preempted": dict(block_size=4, num_kv_blocks=90, max_num_batched_tokens=50),
}


@pytest.mark.parametrize("core", ["in_process", "core_process"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_reference(tiny_checkpoint, setting, core):
    """In every scheduling regime, with the engine core in this process and in its own (where
    its scheduler cannot be watched: chunking is checked in process)."""
    llm = LLM(model=tiny_checkpoint, device="cpu", engine_core_process=core == "core_process",
              **SETTINGS[setting])
    try:
        steps = _record_steps(llm) if core == "in_process" else None
        prompts = _prompts(LENGTHS)
        assert _greedy(llm, prompts) == _expected(tiny_checkpoint, prompts)
        if steps is not None and "max_num_batched_tokens" in SETTINGS[setting]:  # budgets below max(LENGTHS)
            _assert_chunked(llm, steps)
        if "preempt" in setting:
            assert llm.get_stats()["num_preemptions"] > 0, "the cache was meant to be too small to avoid preemption"
        _assert_no_leak(llm)
    finally:
        llm.shutdown()


def test_synchronous_steps_match_the_reference_too(tiny_checkpoint):
    """async_scheduling=False (each step's samples back before the next is scheduled) in the
    regimes where overlap changes most: preemption and chunked prefill."""
    for setting in ("preemption", "tiny_blocks_chunked_and_preempted"):
        llm = LLM(model=tiny_checkpoint, device="cpu", async_scheduling=False, **SETTINGS[setting])
        prompts = _prompts(LENGTHS)
        assert _greedy(llm, prompts) == _expected(tiny_checkpoint, prompts)
        assert llm.get_stats()["num_preemptions"] > 0
        _assert_no_leak(llm)


def test_prefix_caching_hits_and_matches(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu", max_num_batched_tokens=512)
    shared = _prompts([150], seed=5)[0]
    prompts = _prompts([1, 20, 60, 3, 90, 17, 40, 8], seed=6, prefix=shared)
    first = _greedy(llm, prompts[:1])
    rest = _greedy(llm, prompts[1:])
    assert first + rest == _expected(tiny_checkpoint, prompts)
    assert llm.get_stats()["prefix_cache_hit_rate"] > 0.5
    _assert_no_leak(llm)


def test_dynamic_ntk_and_logn_through_the_paged_path(ntk_checkpoint):
    llm = LLM(model=ntk_checkpoint, device="cpu", max_num_batched_tokens=96)
    prompts = _prompts([5, 64, 65, 129, 260], seed=3)
    # The same prompt tokens at two NTK alphas must not share cached blocks.
    prompts.append(prompts[3][:100])
    assert _greedy(llm, prompts) == _expected(ntk_checkpoint, prompts)
    _assert_no_leak(llm)


def test_abort_mid_way_frees_blocks(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu", max_num_batched_tokens=64)
    engine = llm.engine
    steps = _record_steps(llm)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts([10, 200, 30, 5])):
        engine.add_request(f"r{i}", prompt_token_ids=p, params=params)
    for _ in range(3):
        engine.step()
    assert llm.get_stats()["num_used_blocks"] > 0
    assert "r1" in _assert_chunked(llm, steps)
    r1 = engine.scheduler.requests["r1"]
    assert 0 < r1.num_computed_tokens < 200 and not r1.output_token_ids  # mid-prefill
    engine.abort_request("r1")  # still prefilling in chunks
    engine.abort_request("r2")
    engine.abort_request("unknown")  # ignored
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id in ("r0", "r3")
    _assert_no_leak(llm)
    out = engine.abort_request("r0")
    assert out is None  # already finished


def test_n_completions_share_prompt_blocks(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu")
    prompt = _prompts([100])[0]
    params = SamplingParams(n=3, max_tokens=6, temperature=0.0, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    expected = _expected(tiny_checkpoint, [prompt], 6)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == expected for c in out.outputs)
    assert llm.get_stats()["prefix_cache_hit_rate"] > 0
    _assert_no_leak(llm)


def test_n_completions_share_prompt_blocks_with_prefix_caching_off(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu", enable_prefix_caching=False)
    prompt = _prompts([100])[0]
    params = SamplingParams(n=3, max_tokens=6, temperature=0.0, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    assert all(c.token_ids == _expected(tiny_checkpoint, [prompt], 6)[0] for c in out.outputs)
    shared = llm.get_stats()["prefix_cache_hit_rate"]
    assert shared > 0  # the siblings hit the first completion's prompt blocks
    # ...but nothing is shared across requests: the same prompt again computes everything.
    llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2, ignore_eos=True),
                 use_tqdm=False)
    assert llm.engine.kv_cache.prefix_cache_stats.hit_tokens == 2 * 96  # still only the siblings' hits
    _assert_no_leak(llm)


def test_seeded_sampling_reproduces_across_batches(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu")
    prompt = _prompts([12])[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[prompt], sampling_params=seeded, use_tqdm=False)[0]
    others = _prompts([5, 40, 9], seed=9)
    mixed = llm.generate(prompt_token_ids=others[:2] + [prompt] + others[2:],
                         sampling_params=[SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True),
                                          SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                                          seeded,
                                          SamplingParams(max_tokens=12, temperature=0.7, seed=7)],
                         use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone.outputs[0].token_ids
    unseeded = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    a, b = llm.generate(prompt_token_ids=[prompt, prompt], sampling_params=unseeded, use_tqdm=False)
    assert a.outputs[0].token_ids != b.outputs[0].token_ids  # unseeded rows draw independently
    _assert_no_leak(llm)


def test_stop_conditions(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu")
    tok = llm.tokenizer
    prompt = _prompts([20], seed=11)[0]
    free = _greedy(llm, [prompt], 12)[0]
    full_text = tok.decode(free)

    # stop_token_ids: ends at the first occurrence, the id is kept, its text is not.
    stop_id = free[4]
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=12, temperature=0.0, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == free[:free.index(stop_id) + 1] and out.finish_reason == "stop"
    assert out.text == tok.decode(free[:free.index(stop_id)])

    # A stop string spanning a token boundary: the last chars of token 3 + first of token 4.
    t3, t4 = tok.decode(free[3:4]), tok.decode(free[4:5])
    assert t3 and t4
    stop = t3[-1:] + t4[:1]
    cut = full_text.find(stop)
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=12, temperature=0.0, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == full_text[:cut]
    assert stop not in out.text

    # max_tokens and min_tokens with EOS banned until reached.
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=5, temperature=0.0))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=8, min_tokens=8, temperature=0.0, stop_token_ids=[free[0]]))[0].outputs[0]
    assert len(out.token_ids) == 8 and free[0] not in out.token_ids
    _assert_no_leak(llm)


def _stream(engine, request_id, prompt, params):
    """Adds one request and steps the engine until it finishes; returns every CompletionOutput
    streamed for it, in order."""
    engine.add_request(request_id, prompt_token_ids=prompt, params=params)
    streamed = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == request_id
            streamed.append(out.outputs[0])
    return streamed


def test_streamed_text_only_grows_and_holds_back_stop_prefixes(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu")
    tok = llm.tokenizer
    prompt = _prompts([30], seed=12)[0]
    free = _greedy(llm, [prompt], 16)[0]
    full = tok.decode(free)
    # The stop string: the text of two consecutive tokens from the middle of the free output,
    # so that it completes one token after its first token's text (a proper prefix of it)
    # was decoded; that text must be held back, never streamed and then taken back.
    for k in range(len(free) // 3, len(free) - 4):
        before, first, second = tok.decode(free[:k]), tok.decode(free[k:k + 1]), tok.decode(free[k + 1:k + 2])
        stop = first + second
        if (first and second and "\ufffd" not in stop and before + stop == tok.decode(free[:k + 2])
                and full.find(stop) == len(before)):
            break
    else:
        pytest.fail("no clean pair of tokens to build the stop string from")
    streamed = _stream(llm.engine, "s", prompt, SamplingParams(max_tokens=16, temperature=0.0, stop=[stop]))
    final = streamed[-1]
    assert final.finish_reason == "stop" and final.text == before  # ends right before the stop
    assert final.token_ids == free[:k + 2]  # stopped as soon as the stop string completed
    seen = ""
    for out in streamed:
        assert out.text.startswith(seen)  # only grows...
        assert before.startswith(out.text)  # ...and never showed any of what was cut off
        seen = out.text
    assert any(len(out.token_ids) == k + 1 for out in streamed)  # the step that had to hold back

    # A prefix of a stop string that never completes is held back only until the text moves past
    # it, and whatever is still held back is released when the request ends.
    never = full[len(full) // 2:len(full) // 2 + 3] + "\x00never"
    streamed = _stream(llm.engine, "t", prompt, SamplingParams(max_tokens=16, temperature=0.0, stop=[never]))
    seen = ""
    for out in streamed:
        assert out.text.startswith(seen) and full.startswith(out.text)
        seen = out.text
    assert seen == full and streamed[-1].finish_reason == "length"
    _assert_no_leak(llm)


def test_logprobs_match_reference(tiny_checkpoint):
    """Each step's top-N logprobs, the sampled token's pair appended after them when it is not
    among them (N=0: only it), and the sampled token's logprob (from the growth of
    cumulative_logprob) equal log_softmax of the no-cache reference model's logits over the
    prompt and the tokens generated so far, padding ids masked. Both float32; paged vs dense
    attention and batched vs single matmuls: observed differences stay below 1e-5, tolerance
    1e-4 (leaving the padding ids unmasked moves the logprobs by ~4e-3)."""
    tol = 1e-4
    llm = LLM(model=tiny_checkpoint, device="cpu", max_num_batched_tokens=32)
    engine = llm.engine
    steps = _record_steps(llm)
    prompts = _prompts([20, 45, 7], seed=41)
    params = {
        "greedy5": SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5),
        # logprobs come from the logits before temperature (sampler.py, step (e))
        "sampled3": SamplingParams(max_tokens=6, temperature=1.5, seed=3, ignore_eos=True, logprobs=3),
        "greedy0": SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0),
    }
    for (rid, p), prompt in zip(params.items(), prompts):
        engine.add_request(rid, prompt_token_ids=prompt, params=p)
    cumulative = {rid: [0.0] for rid in params}
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            assert len(c.token_ids) == len(cumulative[out.request_id])  # one new token per output
            cumulative[out.request_id].append(c.cumulative_logprob)
            final[out.request_id] = c
    _assert_chunked(llm, steps)  # the 45-token prompt was prefilled in chunks

    model, _ = _reference(tiny_checkpoint)
    off_top = 0
    for (rid, p), prompt in zip(params.items(), prompts):
        c = final[rid]
        tokens, n = c.token_ids, len(c.token_ids)
        assert n == 6 and len(c.logprobs) == n
        # Position len(prompt) - 1 + i predicts output token i (the model is causal).
        ref = _reference_logits(model, prompt + tokens[:-1], slice(len(prompt) - 1, None),
                                model.config.ntk_alpha(len(prompt))).log_softmax(dim=-1)
        sampled = [b - a for a, b in zip(cumulative[rid], cumulative[rid][1:])]
        for i, token in enumerate(tokens):
            assert token < VOCAB_REAL
            assert abs(sampled[i] - ref[i, token].item()) <= tol, (rid, i)
            if p.temperature == 0.0:
                assert token == int(ref[i].argmax())
            else:
                off_top += token != int(ref[i].argmax())
            # The entry: the top-N pairs, then the sampled token's pair when it is not among them.
            entry = c.logprobs[i]
            ids = [t for t, _ in entry[:p.logprobs]]
            values = [v for _, v in entry[:p.logprobs]]
            assert len(ids) == p.logprobs and len(set(ids)) == len(ids), (rid, i)
            if token in ids:
                assert len(entry) == p.logprobs, (rid, i)
            else:
                assert len(entry) == p.logprobs + 1 and entry[-1][0] == token, (rid, i)
                assert abs(entry[-1][1] - ref[i, token].item()) <= tol, (rid, i)
            if not ids:
                continue
            assert values == sorted(values, reverse=True)
            torch.testing.assert_close(torch.tensor(values), ref[i, ids], atol=tol, rtol=0)
            # Nothing left out is more likely than what was kept (this way ties cannot flake).
            rest = ref[i].clone()
            rest[ids] = float("-inf")
            assert rest.max().item() <= values[-1] + tol, (rid, i)
    assert off_top > 0  # the sampled row's logprobs were checked also for tokens other than the top
    _assert_no_leak(llm)


@torch.inference_mode()
def _reference_penalised_greedy(model, prompt, max_tokens, repetition_penalty=1.0,
                                presence_penalty=0.0, frequency_penalty=0.0):
    """Greedy decoding by full recomputation with the penalties applied by hand each step:
    HF repetition penalty once per distinct id of prompt + output (logit < 0: * p, else / p),
    then OpenAI presence / frequency over the output's counts. Returns the tokens and whether
    the penalties changed the argmax at some step."""
    alpha = model.config.ntk_alpha(len(prompt))
    out, changed = [], False
    for _ in range(max_tokens):
        logits = _reference_logits(model, prompt + out, [-1], alpha)[0]
        unpenalised = int(logits.argmax())
        for t in set(prompt + out):
            logits[t] = logits[t] * repetition_penalty if logits[t] < 0 else logits[t] / repetition_penalty
        for t, count in Counter(out).items():
            logits[t] -= presence_penalty + frequency_penalty * count
        out.append(int(logits.argmax()))
        changed |= out[-1] != unpenalised
    return out, changed


# Chosen so that on the tiny model the penalties change the argmax of every penalised row at some
# step (its logits spread ~3 around, so mild positive penalties rarely would); row 2's output also
# differs from that of repetition + presence alone, rows 3 and 4 from repetition alone: the
# output counts matter.
PENALTIES = [
    (40, dict(repetition_penalty=0.3)),
    (90, dict(repetition_penalty=0.5, presence_penalty=-1.0, frequency_penalty=1.0)),
    (25, dict(repetition_penalty=0.5, presence_penalty=1.0, frequency_penalty=0.5)),
    (120, dict(repetition_penalty=0.45, presence_penalty=-2.0, frequency_penalty=2.0)),
    (33, dict()),  # no penalties, in the same batches
]


def test_penalties_match_reference_through_preemption_and_chunking(tiny_checkpoint):
    """Exact greedy tokens: the engine's penalties (which must see the output tokens of a request
    resumed after preemption) against the reference loop above."""
    llm = LLM(model=tiny_checkpoint, device="cpu", num_kv_blocks=12, max_num_batched_tokens=48)
    steps = _record_steps(llm)
    prompts = _prompts([n for n, _ in PENALTIES], seed=31)
    for i, (prompt, (_, kw)) in enumerate(zip(prompts, PENALTIES)):
        llm.engine.add_request(str(i), prompt_token_ids=prompt, params=SamplingParams(
            max_tokens=12, temperature=0.0, ignore_eos=True, **kw))
    outs = {}
    while llm.engine.has_unfinished_requests():
        outs.update((out.request_id, out.outputs[0]) for out in llm.engine.step())
    model, _ = _reference(tiny_checkpoint)
    for i, (prompt, (_, kw)) in enumerate(zip(prompts, PENALTIES)):
        expected, changed = _reference_penalised_greedy(model, prompt, 12, **kw)
        assert outs[str(i)].token_ids == expected, kw
        assert changed == bool(kw), kw  # every penalised row's penalties decide some step
    _assert_chunked(llm, steps)
    resumed = [int(rid) for _, new in steps for rid, known, _, _ in new if known > PENALTIES[int(rid)][0]]
    assert any(PENALTIES[i][1] for i in resumed), "no penalised request was resumed with output"
    _assert_no_leak(llm)


def test_max_tokens_none_runs_to_max_model_len(tiny_checkpoint):
    """max_tokens=None generates until prompt + output == max_model_len, then "length"; a larger
    max_tokens is cut there too. Tokens against the reference's greedy run of that length."""
    max_model_len = 45
    llm = LLM(model=tiny_checkpoint, device="cpu", max_model_len=max_model_len)
    engine = llm.engine
    prompts = _prompts([30, 44, 12, 40], seed=51)
    max_tokens = [None, None, None, 100]
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), prompt_token_ids=prompt,
                           params=SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            total = len(out.prompt_token_ids) + len(c.token_ids)
            assert total <= max_model_len
            assert c.finished == (total == max_model_len), (out.request_id, total)
            final[out.request_id] = c
    for i, prompt in enumerate(prompts):
        c = final[str(i)]
        assert c.finish_reason == "length"
        assert len(prompt) + len(c.token_ids) == max_model_len
        assert c.token_ids == _expected(tiny_checkpoint, [prompt], max_model_len - len(prompt))[0]
    _assert_no_leak(llm)


def test_chat_and_defaults(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu")
    out = llm.chat([{"role": "user", "content": "你好"}], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out.prompt_token_ids[:3] == [151644, 8948, 198] and out.prompt_token_ids[-2:] == [77091, 198]
    assert len(out.outputs[0].token_ids) <= 4
    defaults = llm.engine.default_params()
    assert defaults.top_p == 0.8 and defaults.repetition_penalty == 1.1 and defaults.max_tokens == 512


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt_token_ids=[]), "prompt"),
    (dict(prompt_token_ids=[5, 999999]), "prompt_token_ids"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "role"),
    (dict(prompt_token_ids=[1] * 9000), "max_model_len"),
])
def test_bad_requests_are_rejected_with_the_field(tiny_checkpoint, kwargs, field):
    llm = _shared_llm(tiny_checkpoint)
    with pytest.raises(ValueError, match=field):
        llm.engine.add_request(params=SamplingParams(max_tokens=4), **kwargs)
    assert not llm.engine.has_unfinished_requests()


def test_request_that_can_never_fit_is_rejected(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu", num_kv_blocks=8)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(prompt_token_ids=[[1] * 100], sampling_params=SamplingParams(max_tokens=100),
                     use_tqdm=False)
    _assert_no_leak(llm)


_SHARED = {}


def _shared_llm(path):
    if path not in _SHARED:
        _SHARED[path] = LLM(model=path, device="cpu")
    return _SHARED[path]


def test_triton_path_matches_reference_path(tiny_checkpoint):
    """The engine on the Triton kernels (interpreted on the CPU) gives the reference path's tokens,
    through chunked prefill and decode."""
    prompts = _prompts([1, 17, 40, 5], seed=21)
    triton_llm = LLM(model=tiny_checkpoint, device="cpu", use_triton=True, max_num_batched_tokens=32)
    steps = _record_steps(triton_llm)
    assert _greedy(triton_llm, prompts, 4) == _expected(tiny_checkpoint, prompts, 4)
    _assert_chunked(triton_llm, steps)  # the 40-token prompt is split
    _assert_no_leak(triton_llm)


def test_decode_graph_buffers_and_padding(tiny_checkpoint):
    """The CUDA-graph decode path's static buffers, padding and size choice, checked on the CPU by
    replaying eagerly over the same static buffers a captured graph would read."""
    from qwenserve.worker.cuda_graphs import DecodeGraphs

    class EagerReplay(DecodeGraphs):
        used = []

        def capture(self):
            for size in self.sizes:
                def replay(size=size):
                    self.used.append(size)
                    self.outputs[size] = self.model(self.input_ids[:size], self.positions[:size],
                                                    self._meta(size))
                self.replays[size] = replay

    llm = LLM(model=tiny_checkpoint, device="cpu", use_triton=True, max_num_batched_tokens=64)
    worker = llm.engine.executor.worker
    graphs = EagerReplay(worker.model, 8, 256, worker.config.block_size, worker.device)
    graphs.capture()
    assert graphs.sizes == [1, 2, 4, 8]
    worker.runner.decode_graphs = graphs
    prompts = _prompts([3, 20, 9], seed=22)  # decodes 3 requests in a padded batch of 4
    assert _greedy(llm, prompts, 4) == _expected(tiny_checkpoint, prompts, 4)
    assert 4 in graphs.used  # three decoding requests ran in the padded size-4 graph
    _assert_no_leak(llm)


def test_request_ids_never_collide(tiny_checkpoint):
    engine = _shared_llm(tiny_checkpoint).engine
    params = SamplingParams(max_tokens=2, temperature=0.0, n=2)
    engine.add_request("x", prompt_token_ids=[1, 2], params=params)  # completions x#0, x#1
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("x", prompt_token_ids=[1, 2], params=params)
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("x#1", prompt_token_ids=[1, 2], params=SamplingParams(max_tokens=2))
    engine.add_request("0", prompt_token_ids=[3], params=SamplingParams(max_tokens=2))
    auto = engine.add_request(prompt_token_ids=[3], params=SamplingParams(max_tokens=2))
    assert auto not in ("0", "x")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_stats()["num_used_blocks"] == 0


def test_finished_only_steps_return_each_request_once_when_it_ends(tiny_checkpoint):
    # LLM.generate steps with finished_only=True: a request's output must come back exactly
    # once, on the step it finishes, equal to what plain steps report at the end.
    def drive(finished_only):
        llm = LLM(model=tiny_checkpoint, device="cpu")
        engine = llm.engine
        for i, (prompt, n) in enumerate(zip(_prompts([5, 30, 12]), (3, 9, 1))):
            engine.add_request(f"r{i}", prompt_token_ids=prompt,
                               params=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        per_step = []
        while engine.has_unfinished_requests():
            per_step.append(engine.step(finished_only=finished_only))
        llm.shutdown()
        return per_step

    plain, finished_only = drive(False), drive(True)
    assert len(plain) == len(finished_only)
    for step_plain, step_finished in zip(plain, finished_only):
        ended = [o for o in step_plain if o.finished]
        assert [o.request_id for o in step_finished] == [o.request_id for o in ended]
        for a, b in zip(step_finished, ended):
            assert a.finished and [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
            assert [c.text for c in a.outputs] == [c.text for c in b.outputs]
    assert any(len(s) > len([o for o in s if o.finished]) for s in plain)  # plain steps do report unfinished ones
    assert sorted(o.request_id for s in finished_only for o in s) == ["r0", "r1", "r2"]



@pytest.mark.parametrize("prefix_caching", [True, False])
def test_num_cached_tokens_counts_the_prompt_tokens_served_from_the_prefix_cache(tiny_checkpoint,
                                                                               prefix_caching):
    """RequestOutput.num_cached_tokens: the prompt tokens whose K/V came from the prefix cache
    when the request was admitted: whole blocks, never the whole prompt (one token is always
    computed), 0 on a first sight and with prefix caching off. Every output of a request,
    streamed or final, reports it."""
    block_size = 16
    llm = LLM(model=tiny_checkpoint, device="cpu", block_size=block_size,
              enable_prefix_caching=prefix_caching)
    prompt = _prompts([40], seed=77)[0]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def cached(ids, p=params):
        return llm.generate(prompt_token_ids=[ids], sampling_params=p)[0].num_cached_tokens

    assert cached(prompt) == 0  # nothing cached yet
    got = [cached(prompt + [5, 6]),  # the 40 shared tokens hold two full blocks
           cached(prompt[:32]),  # two full blocks, but the last token is always recomputed
           cached(prompt, SamplingParams(n=2, max_tokens=3, temperature=0.8, seed=1))]
    assert got == ([32, 16, 32] if prefix_caching else [0, 0, 0])
    for c in got:
        assert c % block_size == 0 and c < len(prompt)

    engine = llm.engine  # streamed outputs carry the same count from the first step on
    engine.add_request("s", prompt_token_ids=prompt, params=params)
    counts = []
    while engine.has_unfinished_requests():
        counts += [out.num_cached_tokens for out in engine.step()]
    assert counts == [32 if prefix_caching else 0] * 3
    _assert_no_leak(llm)


# Greedy on the built-in model, these one-token prompts start their completion with a special
# token (<|extra_56|>, <|extra_18|>), found by searching the greedy next token of the first 4096
# ids; the test checks that this still holds.
SPECIAL_FIRST_PROMPTS = [[838], [3354]]


def test_skip_special_tokens_in_the_engine(tiny_checkpoint):
    """skip_special_tokens=False keeps the special tokens' names in the text (streamed and
    final), True (the default) leaves them out; the ids are the same, and each text is
    QwenTokenizer.decode of the ids with the same setting."""
    llm = _shared_llm(tiny_checkpoint)
    tok = llm.tokenizer
    texts = {}
    for skip in (False, True):
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, skip_special_tokens=skip)
        outs = llm.generate(prompt_token_ids=SPECIAL_FIRST_PROMPTS, sampling_params=params, use_tqdm=False)
        texts[skip] = [(o.outputs[0].text, o.outputs[0].token_ids) for o in outs]
        for text, ids in texts[skip]:
            assert text == tok.decode(ids, skip_special_tokens=skip)
        # Streamed: the text only grows, through the special token.
        streamed = _stream(llm.engine, f"stream-{skip}", SPECIAL_FIRST_PROMPTS[0], params)
        seen = ""
        for out in streamed:
            assert out.text.startswith(seen)
            seen = out.text
        assert (seen, streamed[-1].token_ids) == texts[skip][0]
    default = llm.generate(prompt_token_ids=SPECIAL_FIRST_PROMPTS, use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True))
    assert [(o.outputs[0].text, o.outputs[0].token_ids) for o in default] == texts[True]
    for (kept, ids), (skipped, same_ids) in zip(texts[False], texts[True]):
        assert ids == same_ids
        specials = [t for t in ids if tok.is_special(t)]
        assert specials and all(t >= 151643 for t in specials), f"premise: no special token in {ids}"
        for t in specials:
            name = tok.decode([t])
            assert name.startswith("<|") and name in kept and name not in skipped
    _assert_no_leak(llm)


def test_step_token_counts_queue_time_and_prefix_token_stats(tiny_checkpoint):
    """What the server's metrics read from the engine: `num_tokens_last_step` is the step's
    scheduled tokens (a prompt's prefill, then one per running request), every output carries
    the request's queue time once admitted, and get_stats' prefix-cache token counters add the
    admissions' prompt tokens and the hit blocks' tokens."""
    llm = LLM(model=tiny_checkpoint, device="cpu", max_num_seqs=1, block_size=16)
    engine = llm.engine
    prompt = _prompts([40], seed=91)[0]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    before = engine.get_stats()
    engine.add_request("a", prompt_token_ids=prompt, params=params)
    engine.add_request("b", prompt_token_ids=prompt + [7], params=params)  # waits: max_num_seqs=1
    steps, queue_times = [], {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps.append(engine.num_tokens_last_step)
        for o in outs:
            assert o.queue_time is not None and o.queue_time >= 0
            assert queue_times.setdefault(o.request_id, o.queue_time) == o.queue_time  # fixed once admitted
    # Steps that computed anything (with overlapped steps, some only collect the last samples).
    assert [n for n in steps if n] == [40, 1, 9, 1]  # "b" hits 32 cached tokens: 9 to compute
    assert queue_times["b"] >= queue_times["a"]  # "b" waited for "a" to finish
    after = engine.get_stats()
    assert after["prefix_cache_query_tokens"] - before["prefix_cache_query_tokens"] == 40 + 41
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 32


def test_continue_final_message_continues_the_assistant_turn(tiny_checkpoint):
    from qwenserve.model.chat_template import encode_chat

    engine = _shared_llm(tiny_checkpoint).engine
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Thought:"}]
    engine.add_request("cont", messages=msgs, continue_final_message=True,
                       params=SamplingParams(max_tokens=1, temperature=0.0))
    outs = []
    while not outs:  # with overlapped steps the first output comes a step later
        outs = [o for o in engine.step() if o.request_id == "cont"]
    assert outs[0].prompt_token_ids == encode_chat(engine.tokenizer, msgs, continue_final_message=True)
    engine.abort_request("cont")
    with pytest.raises(ValueError, match="continue_final_message: only applies to chat"):
        engine.add_request(prompt="hi", continue_final_message=True)
