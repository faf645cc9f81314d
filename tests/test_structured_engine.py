"""Structured output through the engine (`LLM.generate`, core in-process) on the closer-preferring
tiny model (tests/structured_model.py: alone it never emits JSON, masked every output must be
valid): the schema suite greedy and seeded, regex and choice, n = 2, the same outputs through
preemption, chunked prefill, prefix caching off and synchronous steps, max_tokens truncation,
and the termination rule (ignore_eos, stop strings and ids, min_tokens).

Oracles: `jsonschema` for the schemas, Python's `re` for regexes, a fresh llguidance matcher
for truncated prefixes, and for the scheduling regimes the default engine's own outputs (the
regimes must not change a single token: greedy is deterministic and seeded rows draw from
their own generators).
"""
import json
import os
import re

import jsonschema
import pytest
import torch

from qwenserve import LLM, SamplingParams, StructuredOutput
from qwenserve.structured_output.compiler import compile_structured_output
from qwenserve.structured_output.vocabulary import END_TOKEN_IDS

from structured_model import write_closer_model
from test_engine import _assert_chunked, _assert_no_leak, _record_steps

with open(os.path.join(os.path.dirname(__file__), "data", "json_schemas.json"), encoding="utf-8") as f:
    SCHEMAS = json.load(f)
SCHEMA = {s["name"]: s["schema"] for s in SCHEMAS}
PROMPT = "Reply in JSON:"
# Long enough to be chunked by a 32-token budget and to fill four shared prefix blocks.
LONG_PROMPT = ("You are a service that answers every question with one JSON value and nothing "
               "else. No prose, no code fences, no comments. Question 17: describe the thing "
               "below as the schema says. Answer:")
MAX_TOKENS = 96
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"#[0-9a-f]{6}"]
CHOICES = [["positive", "negative", "neutral"], ['say "hi"', "東京", "a\nb"]]
ENGINE = dict(device="cpu", dtype="float32", seed=0, kv_cache_memory=64 * 1024 ** 2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Small matrices on 2 shared cores: a second intra-op thread makes these tests slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def closer_dir(tiny_checkpoint, tmp_path_factory) -> str:
    return write_closer_model(tiny_checkpoint, str(tmp_path_factory.mktemp("closer-model")))


@pytest.fixture(scope="module")
def llm(closer_dir):
    engine = LLM(model=closer_dir, **ENGINE)
    yield engine
    engine.shutdown()


def schema_params(schema, sampling: str, index: int, **kw) -> SamplingParams:
    mode = dict(temperature=0.0) if sampling == "greedy" else dict(temperature=1.0, top_p=0.95, seed=index)
    return SamplingParams(**{"max_tokens": MAX_TOKENS, **mode, **kw},
                          structured_output=StructuredOutput(json_schema=schema))


def check_valid(completion, schema) -> None:
    assert completion.finish_reason == "stop", completion
    assert completion.token_ids[-1] in END_TOKEN_IDS
    assert not END_TOKEN_IDS & set(completion.token_ids[:-1])  # one end, at the end
    jsonschema.validate(json.loads(completion.text), schema)


def completions(llm, prompt, params) -> list:
    return [o.outputs[0] for o in llm.generate([prompt] * len(params), params, use_tqdm=False)]


@pytest.fixture(scope="module")
def greedy_suite(llm) -> list:
    return completions(llm, PROMPT, [schema_params(s["schema"], "greedy", i) for i, s in enumerate(SCHEMAS)])


# ---------------------------------------------------------------- the schema suite, regex, choice

def test_every_schema_validates_greedy(greedy_suite):
    assert len(SCHEMAS) >= 50
    for completion, s in zip(greedy_suite, SCHEMAS):
        check_valid(completion, s["schema"])


def test_every_schema_validates_seeded_and_seeds_reproduce(llm, greedy_suite):
    params = [schema_params(s["schema"], "seeded", i) for i, s in enumerate(SCHEMAS)]
    outs = completions(llm, PROMPT, params)
    for completion, s in zip(outs, SCHEMAS):
        check_valid(completion, s["schema"])
    assert sum(o.token_ids != g.token_ids for o, g in zip(outs, greedy_suite)) >= 10  # really sampled
    # A seeded request's output does not depend on its batch: alone, the same tokens.
    for i in (0, 17, 49):
        assert completions(llm, PROMPT, [params[i]])[0].token_ids == outs[i].token_ids


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_regex_and_choice_outputs_match(llm, sampling):
    specs = [StructuredOutput(regex=r) for r in REGEXES] + [StructuredOutput(choice=c) for c in CHOICES]
    mode = dict(temperature=0.0) if sampling == "greedy" else dict(temperature=1.0, seed=3)
    outs = completions(llm, PROMPT, [SamplingParams(max_tokens=48, structured_output=s, **mode) for s in specs])
    for completion, spec in zip(outs, specs):
        assert completion.finish_reason == "stop", completion
        if spec.regex is not None:
            assert re.fullmatch(spec.regex, completion.text), (spec.regex, completion.text)
        else:
            assert completion.text in spec.choice


def test_n_completions_each_validate_and_follow_their_seeds(llm):
    names = ["person", "order", "array_of_objects", "anyof_objects", "config_file"]
    params = [schema_params(SCHEMA[n], "seeded", 100 + i, n=2) for i, n in enumerate(names)]
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    for out, name, p in zip(outs, names, params):
        assert [c.index for c in out.outputs] == [0, 1]
        for c in out.outputs:
            check_valid(c, SCHEMA[name])
        # Completion i is the request with seed + i (the front end's fan-out rule), alone.
        for c in out.outputs:
            alone = schema_params(SCHEMA[name], "seeded", p.seed + c.index)
            assert completions(llm, PROMPT, [alone])[0].token_ids == c.token_ids
    assert any(out.outputs[0].token_ids != out.outputs[1].token_ids for out in outs)


# ---------------------------------------------------------------- scheduling regimes

def regime_workload() -> list[SamplingParams]:
    """Every other schema greedy and seeded, the regexes and choices: 68 requests."""
    schemas = [s["schema"] for s in SCHEMAS[::2]]
    params = [schema_params(s, "greedy", i) for i, s in enumerate(schemas)]
    params += [schema_params(s, "seeded", i) for i, s in enumerate(schemas)]
    params += [SamplingParams(max_tokens=48, temperature=1.0, seed=i, structured_output=StructuredOutput(regex=r))
               for i, r in enumerate(REGEXES)]
    params += [SamplingParams(max_tokens=48, temperature=0.0, structured_output=StructuredOutput(choice=c))
               for c in CHOICES]
    return params


def check_regime_outputs(outs, params) -> None:
    for completion, p in zip(outs, params):
        assert completion.finish_reason == "stop"
        spec = p.structured_output
        if spec.kind == "json_schema":
            jsonschema.validate(json.loads(completion.text), spec.schema())
        elif spec.kind == "regex":
            assert re.fullmatch(spec.regex, completion.text)
        else:
            assert completion.text in spec.choice


@pytest.fixture(scope="module")
def regime_baseline(llm) -> list:
    params = regime_workload()
    outs = completions(llm, LONG_PROMPT, params)
    check_regime_outputs(outs, params)
    assert llm.get_stats()["prefix_cache_hit_rate"] > 0  # the long prompt is shared
    return [c.token_ids for c in outs]


REGIMES = {
    # Prompt blocks are shared (4 full blocks), each request needs 2-3 of its own: a handful run
    # at once and the rest preempt each other.
    "preemption": dict(num_kv_blocks=16, max_num_batched_tokens=256),
    "chunked_prefill": dict(max_num_batched_tokens=32),
    "prefix_caching_off": dict(enable_prefix_caching=False),
    "synchronous_steps": dict(async_scheduling=False),
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_scheduling_regimes_give_the_same_outputs(closer_dir, regime_baseline, regime):
    engine = LLM(model=closer_dir, **{**ENGINE, **REGIMES[regime]})
    try:
        steps = _record_steps(engine)
        params = regime_workload()
        outs = completions(engine, LONG_PROMPT, params)
        check_regime_outputs(outs, params)
        assert [c.token_ids for c in outs] == regime_baseline
        stats = engine.get_stats()
        if regime == "preemption":
            assert stats["num_preemptions"] > 0, "the cache was meant to be too small to avoid preemption"
        if regime == "chunked_prefill":
            _assert_chunked(engine, steps)
        if regime == "prefix_caching_off":
            assert stats["prefix_cache_hit_rate"] == 0
        _assert_no_leak(engine)
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- truncation and termination

def test_max_tokens_truncation_is_length_and_a_prefix_the_grammar_accepts(llm):
    names = ["person", "order", "config_file", "ref_defs", "escaped_keys", "matrix"]
    params = [schema_params(SCHEMA[n], "seeded", i, max_tokens=5) for i, n in enumerate(names)]
    for completion, p in zip(completions(llm, PROMPT, params), params):
        assert completion.finish_reason == "length" and len(completion.token_ids) == 5
        fresh = compile_structured_output(p.structured_output).new_matcher()
        assert fresh.try_consume_tokens(completion.token_ids) == 5 and not fresh.is_error()
        with pytest.raises(ValueError):
            json.loads(completion.text)


def test_ignore_eos_stop_strings_and_stop_ids_do_not_cut_a_structure(llm, greedy_suite):
    names = ["person", "order", "function_call", "matrix"]
    for name in names:
        plain = greedy_suite[[s["name"] for s in SCHEMAS].index(name)]
        text, ids = plain.text, plain.token_ids
        # A stop string that occurs in the middle of the output, and the output's own first id.
        stop = text[len(text) // 2: len(text) // 2 + 3]
        p = schema_params(SCHEMA[name], "greedy", 0, ignore_eos=True, stop=[stop, '"'],
                          stop_token_ids=[ids[0]])
        completion = completions(llm, PROMPT, [p])[0]
        assert (completion.text, completion.token_ids, completion.finish_reason) == (text, ids, "stop")
    # Without a structure the same stop string does cut (the rule is the structure's, not a no-op).
    unstructured = SamplingParams(max_tokens=40, temperature=0.0, stop=['"'], ignore_eos=True)
    assert '"' not in completions(llm, PROMPT, [unstructured])[0].text


def test_min_tokens_lengthens_an_open_structure_and_never_a_complete_one(llm, greedy_suite):
    by_name = dict(zip([s["name"] for s in SCHEMAS], greedy_suite))
    # 'false' is complete and nothing may follow it but the end: it ends, early, once.
    short = completions(llm, PROMPT, [schema_params(SCHEMA["bool"], "greedy", 0, min_tokens=8)])[0]
    assert short.token_ids == by_name["bool"].token_ids and short.finish_reason == "stop"
    # An integer may go on: the end is banned until min_tokens, so it has more digits.
    for name, min_tokens in (("int", 6), ("number", 5)):
        assert len(by_name[name].token_ids) < min_tokens
        longer = completions(llm, PROMPT, [schema_params(SCHEMA[name], "greedy", 0, min_tokens=min_tokens)])[0]
        check_valid(longer, SCHEMA[name])
        assert len(longer.token_ids) >= min_tokens


# ---------------------------------------------------------------- failures inside a step

def test_a_matcher_failure_mid_generation_aborts_that_request_only(llm, greedy_suite, caplog):
    """A token the matcher rejects (here: llguidance's answer for the third token turned into a
    rejection) fails the row in the step's mask; the request ends with "abort", the failure
    logged, its other tokens kept, and its neighbours' outputs unchanged."""
    engine = llm.engine
    runner = engine.executor.worker.runner
    by_name = dict(zip([s["name"] for s in SCHEMAS], greedy_suite))
    names = ["person", "order", "matrix"]
    ids = [engine.add_request(prompt=PROMPT, params=schema_params(SCHEMA[n], "greedy", 0)) for n in names]
    victim = ids[0]
    done = {}
    while engine.has_unfinished_requests():
        state = runner.requests.get(victim)
        matcher = state.sampling.grammar_matcher if state is not None else None
        if matcher is not None and not hasattr(matcher, "sabotaged"):
            advanced = matcher.advanced

            def reject_the_third(token, accepted, advanced=advanced, matcher=matcher):
                advanced(token, accepted and matcher.num_consumed != 2)

            matcher.advanced, matcher.sabotaged = reject_the_third, True
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    failed = done[victim]
    assert failed.finish_reason == "abort"
    assert failed.token_ids == by_name["person"].token_ids[:3]  # the rejected token was already out
    assert "is not allowed by the grammar" in caplog.text
    for rid, name in zip(ids[1:], names[1:]):
        assert done[rid].token_ids == by_name[name].token_ids and done[rid].finish_reason == "stop"
    _assert_no_leak(llm)


def test_a_grammar_that_cannot_be_built_in_the_step_aborts_before_any_token(llm, monkeypatch, caplog):
    """The grammar compiled when the request was made, but the step's compile fails (a time
    limit under load, an evicted cache entry that no longer builds): the request is aborted
    with no token, the reason logged; the step and the other rows go on."""
    import qwenserve.structured_output.batch as batch

    spec = StructuredOutput(regex=r"[0-9]{3}-[0-9]{4}")
    params = [SamplingParams(max_tokens=16, temperature=0.0, structured_output=spec),
              schema_params(SCHEMA["int"], "greedy", 0)]
    compile_ = batch.compile_structured_output

    def fail_the_regex(s):
        if s == spec:
            raise ValueError("structured_output.regex: injected failure")
        return compile_(s)

    monkeypatch.setattr(batch, "compile_structured_output", fail_the_regex)
    failed, fine = completions(llm, PROMPT, params)
    assert (failed.finish_reason, failed.token_ids, failed.text) == ("abort", [], "")
    assert "injected failure" in caplog.text
    check_valid(fine, SCHEMA["int"])
    _assert_no_leak(llm)
