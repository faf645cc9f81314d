"""Moving engine deltas to an HTTP client: SSE framing, early errors, and client disconnects.

Owns three rules of the HTTP front end:

- Framing is OpenAI's: each event is `data: <json>\\n\\n`, the stream ends with
  `data: [DONE]\\n\\n`; an error after the 200 went out is one `data: {"error": ...}` event.
- Errors that can still change the status (bad input found by the engine, queue full, engine
  down) surface before the response starts: each request's first engine output is awaited
  (`prime`) before the 200 and its headers are sent.
- A client that disconnects aborts its requests at once, streaming or not, whatever they are
  waiting for (`DisconnectAwareStreamingResponse`, `until_disconnected`): the engine client's
  generate aborts a request whose consumer leaves.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Optional

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


class PrimedStream:
    """An engine stream whose first output has arrived (so it has not failed to start)."""

    def __init__(self, stream: AsyncIterator, first: list):
        self.stream, self.first = stream, first

    async def __aiter__(self):
        yield self.first
        async for item in self.stream:
            yield item

    async def aclose(self) -> None:
        await self.stream.aclose()


async def prime(streams: list) -> list[PrimedStream]:
    """Waits for every stream's first output; if one fails, all are closed (their requests
    aborted) and its exception is raised."""
    async def first(stream):
        return await stream.__anext__()

    tasks = [asyncio.ensure_future(first(s)) for s in streams]
    try:
        firsts = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        raise
    return [PrimedStream(s, f) for s, f in zip(streams, firsts)]


async def merged(streams: list[PrimedStream]) -> AsyncIterator[tuple[int, list]]:
    """(stream index, output) from every stream as they come; leaving early closes them all."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    ended = object()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer below
            await queue.put((i, e))
            return
        finally:
            await stream.aclose()
        await queue.put((i, ended))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, item = await queue.get()
            if item is ended:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable) -> Any:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled (its
    requests aborted) and ClientDisconnected raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnected()
    return task.result()


class DisconnectAwareStreamingResponse(StreamingResponse):
    """A StreamingResponse that always listens for the client's disconnect and then stops the
    body iterator at once (Starlette only notices on its next write under ASGI spec 2.4, which
    for a request still waiting in the queue could be minutes away)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke mid-write
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await _wait_for_disconnect(receive)
            group.cancel_scope.cancel()
        # Cancelled while writing, the body iterator is left suspended: close it now (its
        # requests are aborted) rather than whenever the garbage collector finds it.
        close = getattr(self.body_iterator, "aclose", None)
        if close is not None:
            await close()


def sse_response(events: AsyncIterator[bytes], headers: Optional[dict] = None) -> StreamingResponse:
    return DisconnectAwareStreamingResponse(events, media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", **(headers or {})})
