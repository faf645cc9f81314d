"""describe_malformed (qwenserve/server/request_parsing.py) against protobuf's own parser: on
bytes protobuf refuses it names the field that is wrong, on bytes protobuf accepts it finds
nothing, and on random corruptions of real requests it never raises."""
import random

import pytest

from qwenserve.server import qwenserve_pb2 as pb
from qwenserve.server.request_parsing import MalformedRequest, describe_malformed, parse_request

GENERATE = pb.GenerateRequest.DESCRIPTOR
GENERIC = "request: not a valid qwenserve.v1.GenerateRequest message"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@pytest.mark.parametrize("text,why", [
    (b"\xed\xa0\x80", "a UTF-16 surrogate"), (b"\xc0\x80", "an overlong NUL"), (b"abc\xe4\xb8", "a cut character"),
])
def test_strings_that_are_not_utf8(text, why):
    data = _field(4, _field(1, _field(1, b"user") + _field(2, text)))
    with pytest.raises(MalformedRequest, match=r"^chat\.messages\[0\]\.content: not valid UTF-8$"):
        parse_request(pb.GenerateRequest, data)


def test_an_unknown_group_is_skipped_like_protobuf_does():
    group = bytes([9 << 3 | 3, 1 << 3 | 0, 7, 10 << 3 | 3, 10 << 3 | 4, 9 << 3 | 4])  # nested groups
    ok = _field(2, b"hi") + group
    assert pb.GenerateRequest.FromString(ok).prompt == "hi"
    assert describe_malformed(GENERATE, ok) == GENERIC  # nothing wrong found
    with pytest.raises(MalformedRequest, match=r"^request \(field 9\): truncated$"):
        parse_request(pb.GenerateRequest, _field(2, b"hi") + group[:-1])
    deep = bytes([9 << 3 | 3]) * 200  # protobuf refuses it too; no recursion here
    assert describe_malformed(GENERATE, deep) == "request (field 9): groups nested too deeply"


def test_a_message_too_long_to_walk_names_no_field():
    many = _field(4, _field(1, _field(1, b"user")) * 12_000 + _field(1, b"\x12\x01\xff"))
    with pytest.raises(MalformedRequest) as err:
        parse_request(pb.GenerateRequest, many)
    assert str(err.value) == GENERIC


def _requests():
    yield pb.GenerateRequest(request_id="abc", prompt="你好, world", params=pb.SamplingParams(
        max_tokens=7, temperature=0.5, stop=["x", "yz"], stop_token_ids=[1, 300000], seed=2 ** 63))
    yield pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[0, 127, 128, 2 ** 32 - 1]), system="s")
    yield pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="é" * 40),
                                                            pb.ChatMessage(role="assistant", content="ok")]))


def test_random_corruptions_agree_with_protobuf():
    """Flip, insert, delete bytes and truncate: whenever protobuf refuses the result, the
    description names a field of the request or says it is not valid; whenever protobuf
    accepts it, the walk finds nothing. Never an exception."""
    rng = random.Random(0)
    field_names = ("request_id", "prompt", "prompt_token_ids", "chat", "params", "system", "request")
    refused = named = 0
    for _ in range(3000):
        data = bytearray(rng.choice(list(_requests())).SerializeToString())
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            kind = rng.random()
            if kind < 0.5:
                data[i] = rng.randrange(256)
            elif kind < 0.7:
                data.insert(i, rng.randrange(256))
            elif kind < 0.85:
                del data[i]
            else:
                del data[i:]
            if not data:
                data = bytearray(b"\x0a")
        data = bytes(data)
        description = describe_malformed(GENERATE, data)
        try:
            pb.GenerateRequest.FromString(data)
        except Exception:
            refused += 1
            assert description.split(":")[0].split(".")[0].split(" ")[0] in field_names, description
            named += description != GENERIC
        else:
            assert description == GENERIC, (data, description)
    assert refused > 1000 and named / refused > 0.95, (refused, named)
