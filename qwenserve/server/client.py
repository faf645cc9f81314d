"""Python clients of the qwenserve gRPC API: `QwenClient` (blocking) and `AsyncQwenClient`.

Owns request building (keyword sampling options -> proto, only the ones given, so the
server applies its defaults to the rest) and stream assembly (deltas -> final result).
Errors are the `grpc.RpcError` the server answered: `.code()` and `.details()`.

    with QwenClient("127.0.0.1:50051") as client:
        client.generate("The capital of Iceland is", max_tokens=16, temperature=0).text
        for delta in client.generate_stream("Once upon a time", max_tokens=32):
            print(delta.text, end="", flush=True)
        client.chat([{"role": "user", "content": "你好"}], system="You are a helpful assistant.")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Optional, Sequence, Union

import grpc

from . import qwenserve_pb2 as pb
from . import qwenserve_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_SAMPLING_FIELDS = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}

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
    """A GenerateRequest; `prompt` may be text or a list of token ids."""
    unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}")
    if prompt is not None and not isinstance(prompt, str):
        prompt, prompt_token_ids = None, prompt
    given = [x is not None for x in (prompt, prompt_token_ids, messages)]
    if sum(given) != 1:
        raise TypeError("give exactly one of prompt, prompt_token_ids, messages")
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    request = pb.GenerateRequest(request_id=request_id, params=params, system=system or "")
    if prompt is not None:
        request.prompt = prompt
    elif prompt_token_ids is not None:
        request.prompt_token_ids.ids.extend(int(i) for i in prompt_token_ids)
    else:
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
            request.chat.messages.add(role=role, content=content)
    return request


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
    """Blocking client over one gRPC channel; thread-safe like the channel itself."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, channel: Optional[grpc.Channel] = None):
        self.address = address
        self.channel = channel or grpc.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def generate_stream(self, prompt: Optional[Prompt] = None, *, timeout: Optional[float] = None,
                        **kwargs) -> Iterator[StreamDelta]:
        """Yields deltas as the server streams them; closing the iterator cancels the call."""
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout)
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
        return list(self.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=timeout).ids)

    def model_info(self, timeout: Optional[float] = None) -> dict:
        return _to_dict(self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout))

    def stats(self, timeout: Optional[float] = None) -> dict:
        return _to_dict(self.stub.GetStats(pb.GetStatsRequest(), timeout=timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "QwenClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncQwenClient:
    """asyncio client (grpc.aio); create and use it inside one running event loop."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, channel: Optional[grpc.aio.Channel] = None):
        self.address = address
        self.channel = channel or grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def generate_stream(self, prompt: Optional[Prompt] = None, *, timeout: Optional[float] = None,
                              **kwargs) -> AsyncIterator[StreamDelta]:
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout)
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
        return list((await self.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=timeout)).ids)

    async def model_info(self, timeout: Optional[float] = None) -> dict:
        return _to_dict(await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout))

    async def stats(self, timeout: Optional[float] = None) -> dict:
        return _to_dict(await self.stub.GetStats(pb.GetStatsRequest(), timeout=timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncQwenClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
