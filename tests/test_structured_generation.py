"""Structured output end to end over a model: the real Sampler on the closer-preferring tiny
model's forward (tests/structured_model.py, tests/structured_generate.py).

The model alone emits closers (never valid JSON); every output here is valid only because
of the mask. Oracles: `jsonschema` for the JSON schemas, Python's `re` for regexes, `ast` for
the Lark grammar, and a fresh matcher for prefixes.
"""
import ast
import json
import os
import re

import jsonschema
import numpy as np
import pytest
import torch

from qwenserve.kernels import get_ops
from qwenserve.model.config import QwenConfig
from qwenserve.model.loader import load_weights
from qwenserve.model.qwen import QWenLMHeadModel
from qwenserve.model.reference import reference_logits
from qwenserve.model.tokenizer import NUM_RANKS, VOCAB_SIZE, QwenTokenizer
from qwenserve.sampling_params import SamplingParams
from qwenserve.structured_output import StructuredOutput
from qwenserve.structured_output.batch import fill_bitmask
from qwenserve.structured_output.compiler import compile_structured_output
from qwenserve.structured_output.vocabulary import END_TOKEN_IDS, allowed_ids

from structured_generate import Generation, continue_generation, generate, new_state
from structured_model import closer_token_ids, write_closer_model

TOK = QwenTokenizer()
PROMPT = TOK.encode("Reply in JSON:")
MAX_TOKENS = 96
with open(os.path.join(os.path.dirname(__file__), "data", "json_schemas.json"), encoding="utf-8") as f:
    SCHEMAS = json.load(f)
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no)", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"#[0-9a-f]{6}",
           r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}", r"[A-Z][a-z]{0,7}( [A-Z][a-z]{0,7}){0,2}"]
CHOICES = [["positive", "negative", "neutral"], ["A", "B", "C", "D"], ['say "hi"', "東京", "a\nb"]]
ARITHMETIC = """
start: expr
expr: term (("+" | "-") term){0,3}
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Small matrices on 2 shared cores: a second intra-op thread makes these tests 3x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def closer_model(tiny_checkpoint, tmp_path_factory):
    path = write_closer_model(tiny_checkpoint, str(tmp_path_factory.mktemp("closer-model")))
    model = QWenLMHeadModel(QwenConfig.from_dir(path), get_ops(False), torch.float32)
    load_weights(model, path)
    return model.eval()


@pytest.fixture(scope="module")
def greedy_suite(closer_model) -> list[Generation]:
    return generate(closer_model, PROMPT, [json_params(s["schema"], "greedy", i) for i, s in enumerate(SCHEMAS)])


def json_params(schema, sampling: str, index: int, **kw) -> SamplingParams:
    mode = dict(temperature=0.0) if sampling == "greedy" else dict(temperature=1.0, top_p=0.95, seed=index)
    return SamplingParams(max_tokens=kw.pop("max_tokens", MAX_TOKENS), **mode,
                          structured_output=StructuredOutput(json_schema=schema, **kw))


def whitespace_outside_strings(text: str) -> bool:
    in_string = escaped = False
    for c in text:
        if in_string:
            in_string = escaped or c != '"'
            escaped = not escaped and c == "\\"
        elif c == '"':
            in_string = True
        elif c in " \t\r\n":
            return True
    return False


def check_valid_json(gens: list[Generation], schemas: list[dict]) -> list[str]:
    texts = []
    for gen, schema in zip(gens, schemas):
        text = gen.text(TOK)
        assert gen.finished_by_end_token, f"no end within {MAX_TOKENS} tokens: {text!r}"
        jsonschema.validate(json.loads(text), schema)
        texts.append(text)
    return texts


# ---------------------------------------------------------------- the schema suite

def test_every_schema_output_parses_and_validates_greedy(greedy_suite):
    assert len(SCHEMAS) >= 50
    texts = check_valid_json(greedy_suite, [s["schema"] for s in SCHEMAS])
    assert not any(whitespace_outside_strings(t) for t in texts)  # compact is the default


def test_every_schema_output_parses_and_validates_seeded(closer_model, greedy_suite):
    schemas = [s["schema"] for s in SCHEMAS]
    gens = generate(closer_model, PROMPT, [json_params(s, "seeded", i) for i, s in enumerate(schemas)])
    texts = check_valid_json(gens, schemas)
    assert not any(whitespace_outside_strings(t) for t in texts)
    assert sum(g.token_ids != s.token_ids for g, s in zip(greedy_suite, gens)) >= 10  # really sampled


def test_free_whitespace_mode_validates_too(closer_model):
    schemas = [s["schema"] for s in SCHEMAS[::3]]
    gens = generate(closer_model, PROMPT, [json_params(s, "seeded", i, disable_any_whitespace=False)
                                           for i, s in enumerate(schemas)])
    check_valid_json(gens, schemas)
    # The mode is real: where compact JSON allows only a quote, free JSON allows whitespace too.
    after_brace = {mode: set(allowed_ids(fill_bitmask([new_state(json_params(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "greedy", 0,
        disable_any_whitespace=mode == "compact"), PROMPT, TOK.encode("{"))])[0].numpy()).tolist())
        for mode in ("compact", "free")}
    assert TOK.encode(" ")[0] in after_brace["free"] and TOK.encode(" ")[0] not in after_brace["compact"]


def test_without_the_mask_the_model_breaks_the_structure(closer_model, greedy_suite):
    plain = [SamplingParams(max_tokens=24, temperature=0.0)] + [
        SamplingParams(max_tokens=24, temperature=1.0, seed=i) for i in range(3)]
    for gen in generate(closer_model, PROMPT, plain):
        assert gen.token_ids[0] in set(closer_token_ids(TOK)) | END_TOKEN_IDS
        with pytest.raises(ValueError):
            json.loads(gen.text(TOK))
    # And under the mask, every output needed it: at some step the model's own first choice
    # was not allowed (the logits come from the same forward, one position at a time).
    gens = greedy_suite[::6]
    logits = reference_logits(closer_model, [PROMPT + g.token_ids[:-1] for g in gens])
    for gen, rows in zip(gens, logits):
        unmasked = rows[len(PROMPT) - 1:, :VOCAB_SIZE].argmax(dim=-1).tolist()
        assert unmasked != gen.token_ids, gen.text(TOK)


# ---------------------------------------------------------------- regex, choice, grammar

@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_regex_choice_and_grammar_outputs_match(closer_model, sampling):
    specs = ([StructuredOutput(regex=r) for r in REGEXES] + [StructuredOutput(choice=c) for c in CHOICES]
             + [StructuredOutput(grammar=ARITHMETIC)])
    mode = dict(temperature=0.0) if sampling == "greedy" else dict(temperature=1.0, seed=7)
    gens = generate(closer_model, PROMPT, [SamplingParams(max_tokens=48, structured_output=s, **mode)
                                           for s in specs])
    for gen, spec in zip(gens, specs):
        text = gen.text(TOK)
        assert gen.finished_by_end_token, text
        if spec.regex is not None:
            assert re.fullmatch(spec.regex, text), (spec.regex, text)
        elif spec.choice is not None:
            assert text in spec.choice
        else:
            expr = ast.parse(text, mode="eval")
            assert all(isinstance(n, (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub))
                       for n in ast.walk(expr)), text


# ---------------------------------------------------------------- truncation and preemption

def test_max_tokens_truncation_leaves_a_prefix_the_grammar_accepts(closer_model):
    schemas = [s["schema"] for s in SCHEMAS if s["name"] in
               ("person", "order", "config_file", "ref_defs", "escaped_keys", "matrix")]
    gens = generate(closer_model, PROMPT, [json_params(s, "seeded", i, max_tokens=5) for i, s in enumerate(schemas)])
    for gen in gens:
        assert len(gen.token_ids) == 5 and not gen.finished_by_end_token  # the engine says "length"
        fresh = compile_structured_output(gen.state.params.structured_output).new_matcher()
        assert fresh.try_consume_tokens(gen.token_ids) == 5 and not fresh.is_error()
        with pytest.raises(ValueError):
            json.loads(gen.text(TOK))


def check_mask_vocabulary(row: np.ndarray, accepting: bool) -> None:
    allowed = set(allowed_ids(row).tolist())
    assert allowed and max(allowed) < VOCAB_SIZE
    assert not (allowed - END_TOKEN_IDS) & set(range(NUM_RANKS, VOCAB_SIZE))  # no other special
    assert bool(allowed & END_TOKEN_IDS) == accepting  # the end only where the grammar may end


def test_a_rebuilt_matcher_gives_the_live_masks_at_every_step(closer_model):
    specs = [StructuredOutput(json_schema=s["schema"]) for s in SCHEMAS[1::6]] + [
        StructuredOutput(regex=r) for r in REGEXES[:3]]
    checked = []

    def compare(active: list[Generation]) -> None:
        live = fill_bitmask([g.state for g in active]).numpy()
        fresh = fill_bitmask([new_state(g.state.params, PROMPT, g.token_ids) for g in active]).numpy()
        np.testing.assert_array_equal(live, fresh)
        for row, g in zip(live, active):
            check_mask_vocabulary(row, g.state.grammar_matcher.is_accepting)
        checked.append(len(active))

    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, structured_output=s)
              for i, s in enumerate(specs)]
    gens = generate(closer_model, PROMPT, params, on_step=compare)
    assert all(g.finished_by_end_token for g in gens) and len(checked) > 5


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_resuming_from_the_output_tokens_changes_nothing(closer_model, sampling):
    schemas = [s["schema"] for s in SCHEMAS[2::8]]
    params = [json_params(s, sampling, i) for i, s in enumerate(schemas)]
    straight = generate(closer_model, PROMPT, params)
    gens = [Generation(new_state(p, PROMPT), p.max_tokens) for p in params]
    steps = 0

    def preempt_at_step_4(active: list[Generation]) -> None:
        nonlocal steps
        steps += 1
        if steps == 4:  # every request preempted, then resumed with a fresh state: only the
            for g in active:  # output tokens survive, and the seeded generator, as the runner keeps it
                generator = g.state.generator
                g.state = new_state(g.state.params, PROMPT, g.token_ids)
                g.state.generator = generator

    continue_generation(closer_model, gens, on_step=preempt_at_step_4)
    assert steps > 4
    assert [g.token_ids for g in gens] == [g.token_ids for g in straight]
    check_valid_json(gens, schemas)
