"""Python clients of the qwenserve gRPC API: `QwenClient` (blocking) and `AsyncQwenClient`.

Owns request building (keyword sampling options -> proto, only the ones given, so the
server applies its defaults to the rest) and stream assembly (deltas -> final result).
Errors are the `grpc.RpcError` the server answered: `.code()` and `.details()`; a value the
request cannot carry (a negative count, a seed over 2**64, a non-finite float, ...) raises
`InvalidRequest` (a `ValueError` naming the field) before anything is sent.

    with QwenClient("127.0.0.1:50051") as client:
        client.generate("The capital of Iceland is", max_tokens=16, temperature=0).text
        for delta in client.generate_stream("Once upon a time", max_tokens=32):
            print(delta.text, end="", flush=True)
        client.chat([{"role": "user", "content": "你好"}], system="You are a helpful assistant.")

    # A server started with --api-key and --ssl-certfile/--ssl-keyfile:
    QwenClient("host:50051", api_key=KEY, root_certificates=open("cert.pem", "rb").read())
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Optional, Sequence, Union

import grpc
from google.protobuf.descriptor import FieldDescriptor

from . import qwenserve_pb2 as pb
from . import qwenserve_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_SAMPLING_FIELDS = {f.name: f for f in pb.SamplingParams.DESCRIPTOR.fields}
_STRUCTURED_OUTPUT_FORMS = frozenset(
    f.name for f in pb.SamplingParams.DESCRIPTOR.oneofs_by_name["structured_output"].fields)
_UINT_LIMITS = {FieldDescriptor.TYPE_UINT64: 2 ** 64, FieldDescriptor.TYPE_UINT32: 2 ** 32}
_FLOAT32_MAX = 3.4028234663852886e38


class InvalidRequest(ValueError):
    """A value the request cannot carry; `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_text(name: str, value: str) -> str:
    """A proto string must be valid UTF-8: no lone surrogates (e.g. undecodable argv bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(name, f"is not valid text (a lone surrogate at position {e.start}); "
                                   "is its input UTF-8?") from None
    return value


def _check_uint(name: str, value, low: int, limit: int) -> int:
    bits = limit.bit_length() - 1
    if not _is_int(value) or not low <= value < limit:
        raise InvalidRequest(name, f"must be an integer in [{low}, 2**{bits}), got {value!r}")
    return int(value)


def _check_sampling(name: str, value):
    """`value` as the proto field `name` carries it; InvalidRequest naming `name` otherwise."""
    descriptor = _SAMPLING_FIELDS[name]
    if name == "top_k" and _is_int(value) and value < 0:
        if value == -1:
            return 0  # vLLM's spelling of "off", as SamplingParams accepts it
        raise InvalidRequest(name, f"must be an integer >= 0 (0 or -1 = off), got {value!r}")
    if descriptor.type in _UINT_LIMITS:
        limit = _UINT_LIMITS[descriptor.type]
        if descriptor.is_repeated:
            if not isinstance(value, (list, tuple)):
                raise InvalidRequest(name, f"must be a list of integers, got {value!r}")
            return [_check_uint(name, v, 0, limit) for v in value]
        return _check_uint(name, value, 0, limit)  # the server checks the rest (max_tokens >= 1, ...)
    if descriptor.type == FieldDescriptor.TYPE_FLOAT:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) \
                or abs(value) > _FLOAT32_MAX:
            raise InvalidRequest(name, f"must be a finite number, got {value!r}")
        return float(value)
    if descriptor.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise InvalidRequest(name, f"must be a bool, got {value!r}")
        return value
    if name == "json_schema":  # a dict is sent as its JSON text
        if isinstance(value, dict):
            value = json.dumps(value)
        if not isinstance(value, str):
            raise InvalidRequest(name, f"must be a dict or its JSON text, got {value!r}")
        return _check_text(name, value)
    if name in ("regex", "grammar"):
        if not isinstance(value, str):
            raise InvalidRequest(name, f"must be a string, got {value!r}")
        return _check_text(name, value)
    if name == "choice":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(name, f"must be a list of strings, got {value!r}")
        return pb.Choices(choices=[_check_text(name, v) for v in value])
    if name == "stop":  # the only repeated string
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, (list, tuple)) or not all(isinstance(v, str) and v for v in stops):
            raise InvalidRequest(name, f"must be a non-empty string or a list of them, got {value!r}")
        return [_check_text(name, v) for v in stops]
    raise AssertionError(f"unhandled sampling field {name}")  # a proto change without one here


def check_timeout(timeout: Optional[float]) -> Optional[float]:
    """None (no deadline) or a positive, finite number of seconds."""
    if timeout is None:
        return None
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise InvalidRequest("timeout", f"must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def check_address(address: str) -> str:
    """A gRPC target (HOST:PORT, [IPv6]:PORT, dns:///..., unix:...); a port out of range is
    rejected here, where gRPC itself would silently connect to the port modulo 65536."""
    if not isinstance(address, str) or not address.strip():
        raise InvalidRequest("address", f"must be a non-empty HOST:PORT string, got {address!r}")
    m = re.search(r"[^:]:(\d+)$", address)
    if m and not address.startswith("unix") and not 1 <= int(m.group(1)) <= 65535:
        raise InvalidRequest("address", f"port must be in [1, 65535], got {address!r}")
    return address


def call_metadata(api_key: Optional[str]) -> tuple:
    """The metadata that carries an API key (none without one)."""
    if api_key is None:
        return ()
    if not isinstance(api_key, str) or not api_key or not api_key.isprintable() or not api_key.isascii():
        raise InvalidRequest("api_key", "must be a non-empty string of printable ASCII characters")
    return (("authorization", f"Bearer {api_key}"),)


def channel_credentials(ssl: bool, root_certificates: Optional[bytes]) -> Optional[grpc.ChannelCredentials]:
    """TLS credentials (None: plaintext). `root_certificates` (PEM bytes) is the CA or
    self-signed certificate to trust, and implies TLS; without it the system's CAs are trusted."""
    if root_certificates is not None and not isinstance(root_certificates, bytes):
        raise InvalidRequest("root_certificates", "must be PEM bytes or None")
    if not ssl and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _check_message(i: int, m) -> tuple:
    if isinstance(m, dict) and set(m) >= {"role", "content"}:
        role, content = m["role"], m["content"]
    elif isinstance(m, (tuple, list)) and len(m) == 2:
        role, content = m
    else:
        raise InvalidRequest(f"messages[{i}]", f"must be a {{'role', 'content'}} dict or a (role, content) "
                                               f"pair, got {m!r}")
    if not isinstance(role, str) or not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}]", f"role and content must be strings, got {m!r}")
    return _check_text(f"messages[{i}].role", role), _check_text(f"messages[{i}].content", content)


Prompt = Union[str, Sequence[int]]
Messages = Sequence[Union[dict, tuple]]


@dataclass
class StreamDelta:
    """One streamed message: what completion `index` gained since its previous message."""
    request_id: str
    index: int
    text: str
    token_ids: list
    finish_reason: Optional[str]  # None while running; "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list = field(default_factory=list)  # per new token: [(token_id, logprob), ...]


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    logprobs: list = field(default_factory=list)


@dataclass
class GenerateResult:
    request_id: str
    prompt_tokens: int
    outputs: list  # Completion per index, in index order

    # The first completion's fields, for the common n=1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> Optional[str]:
        return self.outputs[0].finish_reason


def build_request(prompt: Optional[Prompt] = None, *, prompt_token_ids: Optional[Sequence[int]] = None,
                  messages: Optional[Messages] = None, system: Optional[str] = None,
                  request_id: str = "", **sampling) -> pb.GenerateRequest:
    """A GenerateRequest; `prompt` may be text or a list of token ids.

    Sampling options set to None are left unset (the server's default). Raises TypeError for
    an unknown option and `InvalidRequest` (a ValueError naming the field) for a value the
    request cannot carry; the server validates the rest (e.g. top_p in (0, 1]).
    """
    unknown = sorted(set(sampling) - set(_SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}")
    if prompt is not None and not isinstance(prompt, str):
        if isinstance(prompt, (bytes, bytearray, dict)) or not hasattr(prompt, "__iter__"):
            raise InvalidRequest("prompt", f"must be a string or a list of token ids, got {prompt!r}")
        prompt, prompt_token_ids = None, prompt
    given = [x is not None for x in (prompt, prompt_token_ids, messages)]
    if sum(given) != 1:
        raise TypeError("give exactly one of prompt, prompt_token_ids, messages")
    if system is not None and not isinstance(system, str):
        raise InvalidRequest("system", f"must be a string or None, got {system!r}")
    if system and messages is None:
        raise InvalidRequest("system", "only applies to chat input (messages)")
    if not isinstance(request_id, str):
        raise InvalidRequest("request_id", f"must be a string, got {request_id!r}")
    for name, text in (("prompt", prompt), ("system", system), ("request_id", request_id)):
        if text is not None:
            _check_text(name, text)
    values = {k: _check_sampling(k, v) for k, v in sampling.items() if v is not None}
    forms = [k for k in values if k in _STRUCTURED_OUTPUT_FORMS]
    if len(forms) > 1:  # a oneof: the proto would silently keep only the last
        raise InvalidRequest("structured_output", f"takes one form, got {', '.join(forms)}")
    request = pb.GenerateRequest(request_id=request_id, params=pb.SamplingParams(**values), system=system or "")
    if prompt is not None:
        request.prompt = prompt
    elif prompt_token_ids is not None:
        if isinstance(prompt_token_ids, (str, bytes, bytearray, dict)) or not hasattr(prompt_token_ids, "__iter__"):
            raise InvalidRequest("prompt_token_ids", f"must be a list of token ids, got {prompt_token_ids!r}")
        ids = list(prompt_token_ids)
        request.prompt_token_ids.ids.extend(_check_uint("prompt_token_ids", i, 0, 2 ** 32) for i in ids)
    else:
        if isinstance(messages, (str, dict)):
            raise InvalidRequest("messages", f"must be a list of messages, got {messages!r}")
        for i, m in enumerate(messages):
            role, content = _check_message(i, m)
            request.chat.messages.add(role=role, content=content)
    return request


def _tokenize_request(text: str) -> pb.TokenizeRequest:
    if not isinstance(text, str):
        raise InvalidRequest("text", f"must be a string, got {text!r}")
    return pb.TokenizeRequest(text=_check_text("text", text))


def to_delta(message: pb.GenerateResponse) -> StreamDelta:
    return StreamDelta(
        request_id=message.request_id, index=message.index, text=message.text,
        token_ids=list(message.token_ids), finish_reason=message.finish_reason or None,
        prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens,
        logprobs=[[(t.token_id, t.logprob) for t in entry.top] for entry in message.logprobs])


class _Assembler:
    """Concatenates deltas into one GenerateResult."""

    def __init__(self):
        self.request_id = ""
        self.prompt_tokens = 0
        self.completions: dict[int, Completion] = {}

    def add(self, delta: StreamDelta) -> None:
        self.request_id = delta.request_id
        self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
        c = self.completions.setdefault(delta.index, Completion(delta.index))
        c.text += delta.text
        c.token_ids.extend(delta.token_ids)
        c.logprobs.extend(delta.logprobs)
        c.finish_reason = delta.finish_reason or c.finish_reason

    def result(self) -> GenerateResult:
        return GenerateResult(self.request_id, self.prompt_tokens,
                              [self.completions[i] for i in sorted(self.completions)])


def _to_dict(message) -> dict:
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


class QwenClient:
    """Blocking client over one gRPC channel; thread-safe like the channel itself.

    `api_key`: sent as `authorization: Bearer KEY` on every call. `ssl=True`: TLS, trusting the
    system's CAs; `root_certificates` (PEM bytes): TLS trusting that certificate instead."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, channel: Optional[grpc.Channel] = None,
                 api_key: Optional[str] = None, ssl: bool = False, root_certificates: Optional[bytes] = None):
        self.address = address if channel is not None else check_address(address)
        self._metadata = call_metadata(api_key) or None
        credentials = channel_credentials(ssl, root_certificates)
        if channel is None:
            channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.channel = channel
        self.stub = pb_grpc.GenerationStub(self.channel)

    def generate_stream(self, prompt: Optional[Prompt] = None, *, timeout: Optional[float] = None,
                        **kwargs) -> Iterator[StreamDelta]:
        """Yields deltas as the server streams them; closing the iterator cancels the call.

        The request is built (and checked) here, so a bad value raises at the call itself."""
        return self._stream(build_request(prompt, **kwargs), check_timeout(timeout))

    def _stream(self, request: pb.GenerateRequest, timeout: Optional[float]) -> Iterator[StreamDelta]:
        call = self.stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            for message in call:
                yield to_delta(message)
        finally:
            call.cancel()  # no-op when the stream already ended; aborts it server-side otherwise

    def generate(self, prompt: Optional[Prompt] = None, **kwargs) -> GenerateResult:
        assembler = _Assembler()
        for delta in self.generate_stream(prompt, **kwargs):
            assembler.add(delta)
        return assembler.result()

    def chat_stream(self, messages: Messages, system: Optional[str] = None, **kwargs) -> Iterator[StreamDelta]:
        return self.generate_stream(messages=messages, system=system, **kwargs)

    def chat(self, messages: Messages, system: Optional[str] = None, **kwargs) -> GenerateResult:
        return self.generate(messages=messages, system=system, **kwargs)

    def tokenize(self, text: str, timeout: Optional[float] = None) -> list:
        return list(self.stub.Tokenize(_tokenize_request(text), timeout=check_timeout(timeout),
                                       metadata=self._metadata).ids)

    def model_info(self, timeout: Optional[float] = None) -> dict:
        return _to_dict(self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=check_timeout(timeout),
                                               metadata=self._metadata))

    def stats(self, timeout: Optional[float] = None) -> dict:
        return _to_dict(self.stub.GetStats(pb.GetStatsRequest(), timeout=check_timeout(timeout),
                                           metadata=self._metadata))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "QwenClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncQwenClient:
    """asyncio client (grpc.aio); create and use it inside one running event loop. `api_key`,
    `ssl` and `root_certificates` as for QwenClient."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, channel: Optional[grpc.aio.Channel] = None,
                 api_key: Optional[str] = None, ssl: bool = False, root_certificates: Optional[bytes] = None):
        self.address = address if channel is not None else check_address(address)
        self._metadata = call_metadata(api_key) or None
        credentials = channel_credentials(ssl, root_certificates)
        if channel is None:
            channel = (grpc.aio.secure_channel(address, credentials) if credentials
                       else grpc.aio.insecure_channel(address))
        self.channel = channel
        self.stub = pb_grpc.GenerationStub(self.channel)

    def generate_stream(self, prompt: Optional[Prompt] = None, *, timeout: Optional[float] = None,
                        **kwargs) -> AsyncIterator[StreamDelta]:
        """An async iterator of deltas; a bad value raises here, before anything is sent."""
        return self._stream(build_request(prompt, **kwargs), check_timeout(timeout))

    async def _stream(self, request: pb.GenerateRequest, timeout: Optional[float]) -> AsyncIterator[StreamDelta]:
        call = self.stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield to_delta(message)
        finally:
            call.cancel()

    async def generate(self, prompt: Optional[Prompt] = None, **kwargs) -> GenerateResult:
        assembler = _Assembler()
        async for delta in self.generate_stream(prompt, **kwargs):
            assembler.add(delta)
        return assembler.result()

    def chat_stream(self, messages: Messages, system: Optional[str] = None, **kwargs) -> AsyncIterator[StreamDelta]:
        return self.generate_stream(messages=messages, system=system, **kwargs)

    async def chat(self, messages: Messages, system: Optional[str] = None, **kwargs) -> GenerateResult:
        return await self.generate(messages=messages, system=system, **kwargs)

    async def tokenize(self, text: str, timeout: Optional[float] = None) -> list:
        return list((await self.stub.Tokenize(_tokenize_request(text), timeout=check_timeout(timeout),
                                              metadata=self._metadata)).ids)

    async def model_info(self, timeout: Optional[float] = None) -> dict:
        return _to_dict(await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=check_timeout(timeout),
                                                     metadata=self._metadata))

    async def stats(self, timeout: Optional[float] = None) -> dict:
        return _to_dict(await self.stub.GetStats(pb.GetStatsRequest(), timeout=check_timeout(timeout),
                                                 metadata=self._metadata))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncQwenClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
