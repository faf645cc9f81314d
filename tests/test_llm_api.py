"""The offline `LLM` API's input handling: what vLLM users pass works the way vLLM treats it,
anything else is a TypeError / ValueError naming the argument, never an AttributeError from
deep inside, and a rejected call leaves nothing behind in the engine."""
import numpy as np
import pytest

from qwenserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
CHAT = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu")
    yield llm
    llm.shutdown()


@pytest.fixture
def clean(llm):
    """Checks after the test that every call, failed or not, left the engine empty and usable."""
    yield llm
    assert not llm.engine.has_unfinished_requests()
    stats = llm.get_stats()
    assert (stats["num_used_blocks"], stats["num_waiting"], stats["num_running"]) == (0, 0, 0)
    assert len(llm.generate("still works", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 3


def _ids(outs):
    return [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs]


def test_flat_prompt_token_ids_is_one_prompt(clean):
    llm = clean
    nested = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY, use_tqdm=False)
    flat = llm.generate(prompt_token_ids=[1, 2, 3], sampling_params=GREEDY, use_tqdm=False)
    assert len(flat) == 1 and flat[0].prompt_token_ids == [1, 2, 3]
    assert _ids(flat) == _ids(nested)
    # numpy arrays, flat or one per prompt, as they come out of a tokenizer
    assert _ids(llm.generate(prompt_token_ids=np.array([1, 2, 3]), sampling_params=GREEDY,
                             use_tqdm=False)) == _ids(nested)
    two = llm.generate(prompt_token_ids=[np.array([1, 2, 3]), (4, 5)], sampling_params=GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in two] == [[1, 2, 3], [4, 5]]
    assert _ids(two)[0] == _ids(nested)[0]


def test_a_string_and_a_list_of_strings(clean):
    llm = clean
    one = llm.generate("Hello", GREEDY, use_tqdm=False)
    many = llm.generate(("Hello", "world"), [GREEDY, GREEDY], use_tqdm=False)
    assert len(one) == 1 and len(many) == 2 and _ids(one) == _ids(many[:1])


@pytest.mark.parametrize("sampling_params", [{"max_tokens": 3}, "greedy", 0.5])
def test_sampling_params_of_another_type_is_a_type_error_saying_what_to_pass(clean, sampling_params):
    with pytest.raises(TypeError, match=r"^sampling_params: .*SamplingParams"):
        clean.generate("hi", sampling_params, use_tqdm=False)


def test_a_list_of_sampling_params_is_checked_item_by_item(clean):
    with pytest.raises(TypeError, match=r"^sampling_params\[1\]: .*SamplingParams"):
        clean.generate(["a", "b"], [GREEDY, {"max_tokens": 3}], use_tqdm=False)
    with pytest.raises(ValueError, match="^sampling_params: 1 given for 2 inputs"):
        clean.generate(["a", "b"], [GREEDY], use_tqdm=False)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(prompts=5), TypeError, r"^prompts: .*got int"),
    (dict(prompts=None), ValueError, r"^input: give exactly one of prompts, prompt_token_ids"),
    (dict(prompts="a", prompt_token_ids=[1]), ValueError, r"^input: give exactly one"),
    (dict(prompts=[1, 2, 3]), TypeError, r"^prompts\[0\]: .*prompt_token_ids="),
    (dict(prompts=["ok", 5]), TypeError, r"^prompts\[1\]: .*got int"),
    (dict(prompts={"prompt": "hi"}), TypeError, r"^prompts: .*got dict"),
    (dict(prompts=[]), ValueError, r"^prompts: .*at least one"),
    (dict(prompts=[""]), ValueError, r"^prompt: must be a non-empty string"),
    (dict(prompt_token_ids=5), TypeError, r"^prompt_token_ids: .*got int"),
    (dict(prompt_token_ids="1 2 3"), TypeError, r"^prompt_token_ids: .*got str"),
    (dict(prompt_token_ids=[]), ValueError, r"^prompt_token_ids: .*at least one"),
    (dict(prompt_token_ids=[[]]), ValueError, r"^prompt"),
    (dict(prompt_token_ids=[[1, 2], "ab"]), TypeError, r"^prompt_token_ids\[1\]: .*got str"),
    (dict(prompt_token_ids=[[1, 2], 3]), TypeError, r"^prompt_token_ids\[1\]: .*got int"),
    (dict(prompt_token_ids=[[1, 2], [3, 2.5]]), ValueError, r"^prompt_token_ids: id 2.5 is not an integer"),
    (dict(prompt_token_ids=[1, 2, 10**9]), ValueError, r"^prompt_token_ids: id 1000000000 is out of range"),
])
def test_bad_generate_input_names_the_argument(clean, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        clean.generate(sampling_params=GREEDY, use_tqdm=False, **kwargs)


def test_chat_one_conversation_or_several(clean):
    llm = clean
    one = llm.chat(CHAT, GREEDY, use_tqdm=False)
    two = llm.chat([CHAT, CHAT + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]],
                   GREEDY, use_tqdm=False)
    assert len(one) == 1 and len(two) == 2 and _ids(one) == _ids(two[:1])


@pytest.mark.parametrize("messages,error,pattern", [
    ([], ValueError, r"^messages: .*at least one message"),  # gRPC: INVALID_ARGUMENT too
    ([[]], ValueError, r"^messages: .*at least one message"),
    ("hi", TypeError, r"^messages: .*got str"),
    (None, TypeError, r"^messages: .*got NoneType"),
    ({"role": "user", "content": "hi"}, TypeError, r"^messages: .*got dict"),
    ([CHAT, "x"], TypeError, r"^messages\[1\]: .*got str"),
    ([CHAT, CHAT[0]], TypeError, r"^messages\[1\]: .*got dict"),
    ([{"role": "robot", "content": "hi"}], ValueError, r"^messages\[0\]\.role"),
])
def test_bad_chat_input_names_the_argument(clean, messages, error, pattern):
    with pytest.raises(error, match=pattern):
        clean.chat(messages, GREEDY, use_tqdm=False)


def test_a_rejected_prompt_in_a_batch_leaves_nothing_behind(clean):
    # The bad one is last: the good ones were already queued and must be taken back.
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        clean.generate(prompt_token_ids=[[1, 2], [3, 4], [-1]], sampling_params=GREEDY, use_tqdm=False)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(prompt_token_ids=5), r"^prompt_token_ids: .*got int"),
    (dict(prompt_token_ids="abc"), r"^prompt_token_ids: .*got str"),
    (dict(prompt="hi", params={"max_tokens": 3}), r"^params: .*SamplingParams.*got dict"),
])
def test_engine_add_request_rejects_bad_types_with_value_errors(clean, kwargs, pattern):
    # The server maps ValueError to INVALID_ARGUMENT; anything else would be an INTERNAL bug.
    with pytest.raises(ValueError, match=pattern):
        clean.engine.add_request(**kwargs)
