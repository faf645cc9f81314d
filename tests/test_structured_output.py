"""Structured output, piece by piece: the spec's checks, compilation and its cache and limits,
the vocabulary rules of the masks, the bitmask apply, the matcher's catch-up, and the mask
inside the sampler (on fake logits; tests/test_structured_generation.py runs a model)."""
import pickle
import re
import threading

import numpy as np
import pytest
import torch

from qwenserve.model.tokenizer import NUM_RANKS, VOCAB_SIZE, QwenTokenizer
from qwenserve.sampling_params import SamplingParams
from qwenserve.server import qwenserve_pb2 as pb
from qwenserve.server.servicer import sampling_kwargs
from qwenserve.structured_output import StructuredOutput
from qwenserve.structured_output.batch import fill_bitmask
from qwenserve.structured_output.compiler import CompiledGrammar, GrammarCompiler
from qwenserve.structured_output.logits_mask import allowed_matrix, apply_bitmask_, unpack_bits_torch
from qwenserve.structured_output.matcher import GrammarMatcher
from qwenserve.structured_output.spec import MAX_SPEC_BYTES
from qwenserve.structured_output.termination import checks_stop_strings, stop_token_ids, stops_before_min_tokens
from qwenserve.structured_output.vocabulary import (
    END_TOKEN_IDS, EOS_TOKEN_ID, MASK_WORDS, allowed_ids, qwen_lltokenizer)
from qwenserve.worker.sampler import Sampler, SamplingState, make_generator

TOK = QwenTokenizer()
V = 151936  # the real checkpoints' logits width


def so_params(**kw) -> SamplingParams:
    sampling = {k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__}
    return SamplingParams(structured_output=StructuredOutput(**kw), **sampling)


def state(params: SamplingParams, output=(), banned=tuple(sorted(END_TOKEN_IDS))) -> SamplingState:
    return SamplingState(params, [1, 2], list(output), banned_token_ids=list(banned))


def mask_of(st: SamplingState) -> np.ndarray:
    return fill_bitmask([st])[0].numpy()


def text_ids(text: str) -> list[int]:
    return TOK.encode(text)


# ---------------------------------------------------------------- the spec's checks

@pytest.mark.parametrize("kwargs, message", [
    ({}, "structured_output: give exactly one of json_schema, json_object, regex, grammar, choice; got none"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"json_object": False}, "got none"),
    ({"json_object": 1}, "structured_output.json_object: must be a bool"),
    ({"json_schema": "{not json"}, "structured_output.json_schema: not valid JSON"),
    ({"json_schema": [1, 2]}, "structured_output.json_schema: must be a JSON object"),
    ({"json_schema": "[1]"}, "structured_output.json_schema: must be a JSON object"),
    ({"json_schema": {"x": float("nan")}}, "structured_output.json_schema: not JSON-serializable"),
    ({"regex": ""}, "structured_output.regex: must not be empty"),
    ({"regex": 5}, "structured_output.regex: must be a string"),
    ({"grammar": 'start: "a" <|im_end|>'}, "structured_output.grammar: special tokens"),
    ({"grammar": "start: <[151644]>"}, "structured_output.grammar: special tokens"),
    ({"choice": "yes"}, "structured_output.choice: must be a list of strings"),
    ({"choice": []}, "structured_output.choice: must not be empty"),
    ({"choice": ["a", ""]}, "structured_output.choice: entries must be non-empty strings"),
    ({"choice": ["a", 3]}, "structured_output.choice: entries must be non-empty strings"),
    ({"regex": "a", "disable_any_whitespace": None}, "structured_output.disable_any_whitespace: must be a bool"),
    ({"regex": "a" * (MAX_SPEC_BYTES + 1)}, f"over the limit of {MAX_SPEC_BYTES}"),
])
def test_spec_shape_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutput(**kwargs)


def test_lark_check_looks_only_outside_literals_and_comments():
    ok = 'start: "<|im_end|>" | /<[a-z]>/ | x  // a <comment>\n# <another>\nx: "\\"<|"'
    assert StructuredOutput(grammar=ok).source == ok


def test_spec_identity_follows_the_grammar_it_compiles_to():
    a = StructuredOutput(json_schema={"type": "object", "properties": {"b": {}, "a": {}}})
    b = StructuredOutput(json_schema='{ "type" : "object", "properties": {"b": {}, "a": {}} }')
    reordered = StructuredOutput(json_schema={"type": "object", "properties": {"a": {}, "b": {}}})
    assert a == b and hash(a) == hash(b)
    assert a != reordered  # property order is generation order
    assert a != StructuredOutput(json_schema=a.source, disable_any_whitespace=False)
    assert StructuredOutput(regex="x") == StructuredOutput(regex="x", disable_any_whitespace=False)
    assert StructuredOutput(choice=["a", "b"]).choice == ("a", "b")
    assert pickle.loads(pickle.dumps(a)) == a  # travels to the workers inside SamplingParams


@pytest.mark.parametrize("kwargs, message", [
    ({"regex": "[a-"}, "structured_output.regex: .*unclosed character class"),
    ({"regex": r"[^\s\S]"}, "structured_output.regex: no output can satisfy it"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "structured_output.json_schema: Unsatisfiable"),
    ({"json_schema": {"$ref": "#/$defs/missing"}}, "structured_output.json_schema: .*does not exist"),
    ({"json_schema": {"type": "string", "pattern": "(unclosed"}}, "structured_output.json_schema: .*regex parse error"),
    ({"grammar": 'start: "a" rule_not_defined'}, "structured_output.grammar: .*unknown name"),
])
def test_samplingparams_rejects_what_does_not_compile(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured_output=StructuredOutput(**kwargs))


def test_samplingparams_takes_only_a_structuredoutput():
    with pytest.raises(ValueError, match="structured_output must be a qwenserve.StructuredOutput, got dict"):
        SamplingParams(structured_output={"regex": "a"})


# ---------------------------------------------------------------- cache and limits

def test_compile_cache_hits_evicts_and_remembers_failures():
    compiler = GrammarCompiler(cache_size=2)
    a, b, c = (StructuredOutput(regex=r) for r in ("a+", "b+", "c+"))
    first = compiler.compile(a)
    assert isinstance(first, CompiledGrammar) and compiler.compile(a) is first
    compiler.compile(b)
    compiler.compile(c)  # evicts a, the least recently used
    assert compiler.cache_info() == {"size": 2, "max_size": 2, "hits": 1, "misses": 3}
    assert compiler.compile(a) is not first
    assert compiler.cache_info()["misses"] == 4
    bad = StructuredOutput(regex="(")
    for _ in range(2):
        with pytest.raises(ValueError, match="structured_output.regex"):
            compiler.compile(bad)
    assert compiler.cache_info()["misses"] == 5  # the failure was cached


def test_compile_time_limit():
    # 1000 optional properties take ~0.1 s to compile, far over a 2 ms limit.
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1000)}}
    qwen_lltokenizer()  # built outside the measured time anyway; not this test's subject
    with pytest.raises(ValueError, match=r"structured_output.json_schema: compiling took .* over the "
                                         r"limit of 0.002 s"):
        GrammarCompiler(time_limit_s=0.002).compile(StructuredOutput(json_schema=schema))
    assert GrammarCompiler(time_limit_s=30).compile(StructuredOutput(json_schema=schema)).grammar


def test_compile_can_run_off_the_callers_thread():
    compiler = GrammarCompiler()
    future = compiler.submit(StructuredOutput(regex="[0-9]{3}"))
    assert future.result(timeout=60).new_matcher().is_accepting() is False


# ---------------------------------------------------------------- vocabulary rules

def test_masks_allow_no_special_token_and_end_tokens_only_where_the_grammar_may_end():
    st = state(so_params(regex="ab?"))
    first = allowed_ids(mask_of(st))
    assert TOK.encode("a")[0] in first
    assert not set(first.tolist()) & set(range(NUM_RANKS, VOCAB_SIZE))  # no special token, no end
    st.output_token_ids.append(TOK.encode("a")[0])
    after_a = set(allowed_ids(mask_of(st)).tolist())
    assert END_TOKEN_IDS <= after_a and TOK.encode("b")[0] in after_a  # may end or go on
    assert after_a - END_TOKEN_IDS <= set(range(NUM_RANKS))
    st.output_token_ids.append(TOK.encode("b")[0])
    assert set(allowed_ids(mask_of(st)).tolist()) == END_TOKEN_IDS  # complete: only the end
    st.output_token_ids.append(EOS_TOKEN_ID)
    assert set(allowed_ids(mask_of(st)).tolist()) == END_TOKEN_IDS
    assert st.grammar_matcher.finished and st.grammar_matcher.error is None


def test_mask_rows_cover_the_real_vocabulary_only():
    mask = fill_bitmask([state(so_params(json_object=True)), state(SamplingParams())])
    assert mask.shape == (2, MASK_WORDS) and MASK_WORDS * 32 < V
    assert allowed_ids(mask[0].numpy()).max() < VOCAB_SIZE
    assert (mask[1] == -1).all()  # the plain row is left alone


def test_a_special_token_the_grammar_smuggles_in_ends_the_request():
    from llguidance import LLMatcher

    # Past the Lark check (it would refuse this grammar): the backstop must hold anyway.
    grammar = LLMatcher.grammar_from_lark('start: "a" <[151644]> "b"')
    spec = StructuredOutput(regex="a")
    compiled = CompiledGrammar(spec, grammar, 0.0, LLMatcher(qwen_lltokenizer(), grammar))
    st = state(SamplingParams())
    st.params.structured_output = spec
    st.grammar_matcher = GrammarMatcher(compiled)
    st.output_token_ids.append(TOK.encode("a")[0])
    assert set(allowed_ids(mask_of(st)).tolist()) == END_TOKEN_IDS
    assert "allows no ordinary token" in st.grammar_matcher.error


def test_a_grammar_that_fails_to_compile_at_the_step_ends_the_request(monkeypatch):
    from qwenserve.structured_output import batch

    st = state(so_params(regex="[0-9]+"))
    monkeypatch.setattr(batch, "compile_structured_output",
                        lambda spec: (_ for _ in ()).throw(ValueError("structured_output.regex: took too long")))
    assert set(allowed_ids(mask_of(st)).tolist()) == END_TOKEN_IDS
    st.output_token_ids.append(EOS_TOKEN_ID)
    assert set(allowed_ids(mask_of(st)).tolist()) == END_TOKEN_IDS
    assert st.grammar_matcher.error == "structured_output.regex: took too long"


# ---------------------------------------------------------------- the bitmask apply

@pytest.mark.parametrize("width, dtype", [(151936, torch.float32), (152064, torch.bfloat16),
                                          (VOCAB_SIZE, torch.float32)])
def test_apply_bitmask_matches_a_per_id_reference(width, dtype):
    gen = torch.Generator().manual_seed(width)
    bitmask = torch.randint(-2 ** 31, 2 ** 31, (3, MASK_WORDS), dtype=torch.int64, generator=gen).to(torch.int32)
    bitmask[1] = 0
    bitmask[1, 5] = 1 << 7  # exactly token 167
    logits = torch.randn(3, width, generator=gen).to(dtype)
    out = apply_bitmask_(logits.clone(), bitmask)
    # Reference: token t is allowed iff bit t % 32 of word t // 32 is set (and t has a word).
    ids = np.arange(width)
    words = bitmask.numpy().astype(np.int64)[:, np.minimum(ids // 32, MASK_WORDS - 1)]
    allowed = ((words >> (ids % 32)) & 1).astype(bool) & (ids < MASK_WORDS * 32)
    expected = logits.masked_fill(torch.from_numpy(~allowed), float("-inf"))
    assert torch.equal(out, expected)
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [167]


def test_the_device_unpacking_matches_the_host_one():
    bitmask = torch.randint(-2 ** 31, 2 ** 31, (4, MASK_WORDS), dtype=torch.int64,
                            generator=torch.Generator().manual_seed(0)).to(torch.int32)
    assert torch.equal(unpack_bits_torch(bitmask), allowed_matrix(bitmask, torch.device("cpu")))


def test_apply_bitmask_checks_its_shapes():
    with pytest.raises(ValueError, match="bitmask must be int32"):
        apply_bitmask_(torch.zeros(2, 64), torch.zeros(3, MASK_WORDS, dtype=torch.int32))


# ---------------------------------------------------------------- the matcher follows the output

def test_matcher_catches_up_rolls_back_and_rebuilds_the_same_masks():
    params = so_params(json_schema={"type": "object", "properties": {"k": {"type": "string"}},
                                    "required": ["k"]})
    tokens = text_ids('{"k":"hello world"}') + [EOS_TOKEN_ID]
    live = state(params)
    for n in range(len(tokens) + 1):
        live.output_token_ids[:] = tokens[:n]
        fresh = state(params, tokens[:n])  # as after a preemption: a new state, the same output
        np.testing.assert_array_equal(mask_of(live), mask_of(fresh))
        assert live.grammar_matcher.num_consumed == n
    for cut in (5, 2, 4, 0):  # cut back (the first from a finished matcher): it rolls back
        live.output_token_ids[:] = tokens[:cut]
        np.testing.assert_array_equal(mask_of(live), mask_of(state(params, tokens[:cut])))
        assert live.grammar_matcher.num_consumed == cut
        assert not live.grammar_matcher.finished and live.grammar_matcher.error is None
        live.output_token_ids[:] = tokens[:cut + 2]
        np.testing.assert_array_equal(mask_of(live), mask_of(state(params, tokens[:cut + 2])))


def test_llguidances_pool_and_the_row_by_row_path_give_the_same_masks(monkeypatch):
    """Which path runs depends on the host's cores (`batch._use_pool`): both are checked here,
    on the same outputs, a plain row, a rejected token and a finished row among them."""
    from qwenserve.structured_output import batch

    schema = {"type": "object", "properties": {"k": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["k", "n"]}
    tokens = text_ids('{"k":"hello world","n":42}') + [EOS_TOKEN_ID]
    specs = [so_params(json_schema=schema)] * 8 + [so_params(regex="[0-9]+"), SamplingParams()]

    def run(use_pool: bool) -> list[np.ndarray]:
        monkeypatch.setattr(batch, "_use_pool", lambda num_rows, early=False: use_pool)
        states = [state(p) for p in specs]
        masks = []
        for n in range(len(tokens) + 1):
            for i, st in enumerate(states[:8]):  # the rows at different points of the same output
                st.output_token_ids[:] = tokens[:max(0, n - i)]
            states[8].output_token_ids[:] = text_ids("12x")[:n]  # "x" is rejected: the row fails
            masks.append(fill_bitmask(states).numpy().copy())
        return masks

    for pooled, row_by_row in zip(run(True), run(False)):
        np.testing.assert_array_equal(pooled, row_by_row)


def test_a_token_the_grammar_rejects_fails_the_row_to_its_end():
    st = state(so_params(regex="[0-9]+"), output=text_ids("12"))
    mask_of(st)
    st.output_token_ids += text_ids("x")
    assert set(allowed_ids(mask_of(st)).tolist()) == END_TOKEN_IDS
    assert "is not allowed by the grammar" in st.grammar_matcher.error


# ---------------------------------------------------------------- inside the sampler

def fake_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_every_sampling_method_sees_only_allowed_tokens():
    variants = [dict(temperature=0.0), dict(temperature=1.0, seed=1), dict(temperature=0.8, top_k=5, seed=2),
                dict(temperature=1.0, top_p=0.5, seed=3), dict(temperature=1.0, min_p=0.2, seed=4),
                dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=1.0, frequency_penalty=0.5,
                     seed=5), dict(temperature=0.0, logprobs=5)]
    states = []
    for kw in variants:
        params = so_params(regex="(yes|no|maybe)", **kw)
        states.append(SamplingState(params, [1], [], make_generator(kw["seed"]) if "seed" in kw else None))
    allowed = [set(allowed_ids(mask_of(state(s.params))).tolist()) for s in states]
    for step in range(3):
        logits = fake_logits(len(states), step)
        out = Sampler(seed=0).sample(logits, states)
        for i, token in enumerate(out.token_ids):
            assert token in allowed[i]
        # greedy: the best allowed token; logprobs: a distribution over the allowed ones only
        best = max(allowed[0], key=lambda t: logits[0, t].item())
        assert out.token_ids[0] == best
        ids = sorted(allowed[-1])
        reference = torch.log_softmax(logits[-1, ids], dim=0)  # over the allowed tokens only
        values, where = reference.topk(5)
        assert [t for t, _ in out.logprobs[-1]] == [ids[j] for j in where.tolist()]
        assert [lp for _, lp in out.logprobs[-1]] == pytest.approx(values.tolist(), abs=1e-5)
        assert out.sampled_logprobs[-1] == pytest.approx(values[0].item(), abs=1e-5)
        for s in states:
            assert s.grammar_matcher.num_consumed == len(s.output_token_ids)  # the draw moved nothing


def test_plain_rows_are_untouched_by_a_structured_neighbour():
    plain = [SamplingState(SamplingParams(temperature=0.0), [1], []) for _ in range(2)]
    structured = SamplingState(so_params(choice=["left", "right"], temperature=0.0), [1], [])
    logits = fake_logits(3, 7)
    alone = Sampler().sample(logits[[0, 2]], plain).token_ids
    mixed = Sampler().sample(logits, [plain[0], structured, plain[1]]).token_ids
    assert [mixed[0], mixed[2]] == alone
    assert mixed[1] in {TOK.encode("left")[0], TOK.encode("right")[0]}


def test_min_tokens_bans_the_end_unless_only_the_end_is_left():
    params = so_params(regex="a+|b", temperature=0.0, min_tokens=3)
    end_bias = torch.zeros(1, V)
    end_bias[0, sorted(END_TOKEN_IDS)] = 100.0  # the model wants to stop at once
    a, b = TOK.encode("a")[0], TOK.encode("b")[0]
    st = SamplingState(params, [1], [a], banned_token_ids=sorted(END_TOKEN_IDS))
    assert Sampler().sample(end_bias, [st]).token_ids[0] == a  # short of min_tokens: go on
    st = SamplingState(params, [1], [b], banned_token_ids=sorted(END_TOKEN_IDS))
    assert Sampler().sample(end_bias, [st]).token_ids[0] in END_TOKEN_IDS  # complete: the end wins


def test_a_structured_request_ends_on_the_end_tokens_only():
    structured = so_params(regex="a+", ignore_eos=True, stop=["a"], stop_token_ids=[64])
    assert stop_token_ids(structured, {64}) == END_TOKEN_IDS and not checks_stop_strings(structured)
    plain = SamplingParams(stop=["a"])
    assert stop_token_ids(plain, {EOS_TOKEN_ID, 7}) == {EOS_TOKEN_ID, 7} and checks_stop_strings(plain)
    # min_tokens is the mask's job for a structure: an end that got through ends it at once.
    assert stops_before_min_tokens(so_params(regex="a+", min_tokens=5))
    assert not stops_before_min_tokens(SamplingParams(min_tokens=5))


# ---------------------------------------------------------------- the proto mapping

def test_proto_oneof_maps_to_structured_output():
    def params(**kw):
        return SamplingParams(**sampling_kwargs(pb.SamplingParams(**kw))).structured_output

    assert params() is None
    assert params(json_schema='{"type":"object"}') == StructuredOutput(json_schema={"type": "object"})
    assert params(json_object=True, disable_any_whitespace=False) == StructuredOutput(
        json_object=True, disable_any_whitespace=False)
    assert params(regex="[ab]").regex == "[ab]"
    assert params(grammar='start: "x"').grammar == 'start: "x"'
    assert params(choice=pb.Choices(choices=["a", "b"])).choice == ("a", "b")
    with pytest.raises(ValueError, match="structured_output.json_object: must be true"):
        params(json_object=False)
    with pytest.raises(ValueError, match="structured_output.json_schema: Unsatisfiable"):
        params(json_schema='{"type":"integer","minimum":2,"maximum":1}')
    with pytest.raises(ValueError, match="structured_output.choice: must not be empty"):
        params(choice=pb.Choices())


def test_the_client_sends_one_form():
    from qwenserve.server.client import InvalidRequest, build_request

    params = build_request("x", json_schema={"type": "object"}, disable_any_whitespace=False).params
    assert params.WhichOneof("structured_output") == "json_schema" and not params.disable_any_whitespace
    assert list(build_request("x", choice=["a", "b"]).params.choice.choices) == ["a", "b"]
    with pytest.raises(InvalidRequest, match="structured_output takes one form, got regex, choice"):
        build_request("x", regex="a", choice=["b"])
    with pytest.raises(InvalidRequest, match="choice must be a list of strings"):
        build_request("x", choice="ab")


def test_an_early_fill_is_used_only_for_the_same_states_and_outputs(monkeypatch):
    """prefetch_bitmask starts the fill on a helper thread; fill_bitmask returns that result for
    the same states with the same outputs (equal to a fresh fill's), and fills afresh, on its
    own thread, when the outputs moved on after the early fill started."""
    from qwenserve.structured_output import batch

    fills = []
    real_fill = batch._fill

    def recording_fill(states, pin_memory, early=False):
        fills.append(threading.current_thread().name)
        return real_fill(states, pin_memory, early)

    monkeypatch.setattr(batch, "_fill", recording_fill)
    schema = {"type": "object", "properties": {"k": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["k", "n"]}
    tokens = text_ids('{"k":"hello world","n":42}')
    live = [state(so_params(json_schema=schema)), state(SamplingParams())]
    assert not batch.prefetch_bitmask(live[1:])  # nothing structured: nothing to start
    for n in range(len(tokens)):
        live[0].output_token_ids[:] = tokens[:n]
        fills.clear()
        assert batch.prefetch_bitmask(live)
        early = fill_bitmask(live).numpy().copy()
        assert fills and all(name.startswith("mask-fill") for name in fills), fills
        np.testing.assert_array_equal(early, fill_bitmask([state(so_params(json_schema=schema), tokens[:n]),
                                                           state(SamplingParams())]).numpy())
    # Stale: the outputs gained a token after the early fill started.
    live[0].output_token_ids[:] = tokens[:3]
    assert batch.prefetch_bitmask(live)
    live[0].output_token_ids.append(tokens[3])
    fills.clear()
    stale_checked = fill_bitmask(live).numpy().copy()
    assert fills[-1] == threading.current_thread().name
    np.testing.assert_array_equal(stale_checked, fill_bitmask([state(so_params(json_schema=schema), tokens[:4]),
                                                               state(SamplingParams())]).numpy())
