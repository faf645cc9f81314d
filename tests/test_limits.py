"""The request-size limits of qwenserve/frontend/limits.py: each check names the field and the
limit, passes at the limit, and the defaults derived from max_model_len are the tightest that
never reject a request the engine could accept (checked against the real tokenizer and ChatML)."""
import pytest

from qwenserve.frontend import limits as L
from qwenserve.frontend.limits import RequestLimits
from qwenserve.model.chat_template import encode_chat
from qwenserve.model.tokenizer import QwenTokenizer, _VENDORED_PATH, _load_ranks

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.from_dir(None)


def test_longest_token_bytes_is_the_vocabularys_longest_token():
    assert max(len(token) for token in _load_ranks(_VENDORED_PATH)) == L.LONGEST_TOKEN_BYTES


def test_resolved_defaults_for_a_max_model_len():
    limits = RequestLimits().resolve(MAX_MODEL_LEN)
    assert limits.max_prompt_chars == 128 * 255
    assert limits.max_chat_messages == (256 - 4) // 5 == 50
    assert limits.max_prompt_token_ids == 255
    assert limits.max_request_bytes == 4 * 128 * 255 + (1 << 20)
    assert (limits.max_request_id_chars, limits.max_stop_strings, limits.max_stop_string_chars,
            limits.max_stop_token_ids) == (256, 16, 512, 256)
    # What an operator sets is kept; what follows from it is derived from it.
    mine = RequestLimits(max_prompt_chars=1000, max_chat_messages=3).resolve(MAX_MODEL_LEN)
    assert (mine.max_prompt_chars, mine.max_chat_messages, mine.max_request_bytes) == (1000, 3, 4000 + (1 << 20))
    assert RequestLimits(max_prompt_chars=10 ** 12).resolve(8192).max_request_bytes == 2 ** 31 - 1


def test_the_default_prompt_limit_is_exactly_the_longest_prompt_that_can_fit(tokenizer):
    """128 x (max_model_len - 1) spaces are max_model_len - 1 tokens of the 128-space token: the
    longest prompt (in characters) the engine accepts, so the limit turns nothing away that fits."""
    limit = RequestLimits().resolve(MAX_MODEL_LEN).max_prompt_chars
    assert len(tokenizer.encode(" " * limit)) == MAX_MODEL_LEN - 1
    L.check_prompt_chars("prompt", limit, RequestLimits().resolve(MAX_MODEL_LEN))


def test_the_default_chat_limit_is_exactly_the_most_messages_that_can_fit(tokenizer):
    limit = RequestLimits().resolve(MAX_MODEL_LEN).max_chat_messages

    def shortest_chat(n):  # a system turn first (no default system prompt), then empty turns
        return [{"role": "system", "content": ""}] + [{"role": "user", "content": ""}] * (n - 1)

    assert len(encode_chat(tokenizer, shortest_chat(limit))) < MAX_MODEL_LEN
    assert len(encode_chat(tokenizer, shortest_chat(limit + 1))) >= MAX_MODEL_LEN


CHECKS = [
    (lambda n, lim: L.check_request_id(n, lim), "max_request_id_chars", "request_id", "characters"),
    (lambda n, lim: L.check_prompt_chars("prompt", n, lim), "max_prompt_chars", "prompt", "characters"),
    (lambda n, lim: L.check_prompt_token_ids(n, lim), "max_prompt_token_ids", "prompt_token_ids", "token ids"),
    (lambda n, lim: L.check_chat_messages(n, lim), "max_chat_messages", "chat.messages", "messages"),
    (lambda n, lim: L.check_stop(["x"] * n, lim), "max_stop_strings", "stop", "strings"),
    (lambda n, lim: L.check_stop(["x" * n], lim), "max_stop_string_chars", "stop[0]", "characters"),
    (lambda n, lim: L.check_stop_token_ids(n, lim), "max_stop_token_ids", "stop_token_ids", "ids"),
]


@pytest.mark.parametrize("check,name,field,unit", CHECKS, ids=[c[1] for c in CHECKS])
def test_each_check_passes_at_its_limit_and_names_field_and_limit_above(check, name, field, unit):
    limits = RequestLimits(**{name: 7}).resolve(MAX_MODEL_LEN)
    check(7, limits)
    with pytest.raises(ValueError) as err:
        check(8, limits)
    assert str(err.value) == f"{field}: 8 {unit} is over the server's limit of 7"


def test_stop_names_the_first_string_over_the_limit():
    with pytest.raises(ValueError, match=r"^stop\[2\]: 513 characters"):
        L.check_stop(["a", "b" * 512, "c" * 513], RequestLimits())


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "8"])
def test_limits_must_be_positive_integers(value):
    with pytest.raises(ValueError, match="max_stop_strings must be a positive integer"):
        RequestLimits(max_stop_strings=value)


def test_max_request_bytes_fits_grpcs_int32():
    RequestLimits(max_request_bytes=2 ** 31 - 1)
    with pytest.raises(ValueError, match="max_request_bytes must be at most 2\\*\\*31 - 1"):
        RequestLimits(max_request_bytes=2 ** 31)


def test_launch_flags_set_the_limits():
    from qwenserve.cli import build_parser
    from qwenserve.server.commands import server_options_from_args

    args = build_parser().parse_args(["launch", "--max-request-id-chars", "64", "--max-prompt-chars", "1000",
                                      "--max-chat-messages", "9", "--max-stop-strings", "2",
                                      "--max-stop-string-chars", "30", "--max-stop-token-ids", "5",
                                      "--max-request-bytes", "8MiB"])
    assert server_options_from_args(args).limits == RequestLimits(
        max_request_id_chars=64, max_prompt_chars=1000, max_chat_messages=9, max_stop_strings=2,
        max_stop_string_chars=30, max_stop_token_ids=5, max_request_bytes=8 << 20)
    assert server_options_from_args(build_parser().parse_args(["launch"])).limits == RequestLimits()


@pytest.mark.parametrize("flag,value,message", [
    ("--max-stop-strings", "0", "must be an integer >= 1, got 0"),
    ("--max-prompt-chars", "many", "not an integer: 'many'"),
])
def test_bad_limit_flags_are_argparse_errors(capsys, flag, value, message):
    from cli_run import run_cli

    code, _, err = run_cli(capsys, "launch", flag, value)
    assert code == 2 and f"argument {flag}: {message}" in err, err


def test_a_max_request_bytes_over_grpcs_limit_fails_launch_before_loading(capsys):
    from cli_run import run_cli

    code, _, err = run_cli(capsys, "launch", "--max-request-bytes", "2GiB")
    assert code == 2 and "qwenserve launch: error: max_request_bytes must be at most 2**31 - 1" in err, err
