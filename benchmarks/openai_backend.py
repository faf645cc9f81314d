"""`benchmarks/run.py serve --backend openai`: the same workload as over gRPC, through the
OpenAI-compatible HTTP API (streamed /v1/completions with the prompt's token ids).

The client reads the SSE stream with httpx and `json.loads`, as vLLM's serving benchmark reads
its OpenAI server with aiohttp, not through the `openai` SDK: on a machine that runs the client
and the server together, the SDK's per-chunk parsing would take CPU from the server and count as
server latency. Each request's record has the fields `datasets.serve_metrics` reads. A streamed
chunk is one engine step of text; its arrival time is a token time (a step whose text is held
back, e.g. half a UTF-8 character, sends no chunk). The output token count is the server's
(`stream_options.include_usage`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Optional

from benchmarks.datasets import BenchRequest, RequestSampling, poisson_arrivals

try:
    import httpx
except ImportError:  # an extra (pip install -e '.[bench]'), not a qwenserve dependency
    httpx = None


def _client(base_url: str, connections: Optional[int] = None):
    if httpx is None:
        raise SystemExit("--backend openai needs httpx: pip install -e '.[bench]'")
    # $QWENSERVE_API_KEY when the server wants a key.
    key = os.environ.get("QWENSERVE_API_KEY")
    return httpx.AsyncClient(base_url=base_url.rstrip("/") + "/v1", timeout=None,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
                             headers={"Authorization": f"Bearer {key}"} if key else {})


def model_info(base_url: str) -> dict:
    """The served model, from GET /v1/models."""
    async def get():
        async with _client(base_url) as client:
            response = await client.get("/models")
            response.raise_for_status()
            return response.json()["data"][0]

    return asyncio.run(get())


async def one_request(clients: "ClientPool", model: str, req: BenchRequest, send_at: float, t0: float,
                      sampling: RequestSampling = RequestSampling()) -> dict:
    await asyncio.sleep(max(0.0, t0 + send_at - time.perf_counter()))
    async with clients.borrow() as client:  # --max-concurrency: sent (and timed) once a slot frees
        return await _stream_request(client, model, req, sampling)


class ClientPool:
    """httpx clients of one connection each, lent one per request in flight. One client with
    hundreds of connections would cost the load generator more than the server: httpx scans
    its whole connection pool on every request and response event (measured: a third of the
    generator's CPU at 256 streams, enough to starve the server on 2 cores)."""

    def __init__(self, base_url: str, size: int, bounded: bool):
        self.clients = [_client(base_url, connections=1) for _ in range(size)]
        self.free: asyncio.Queue = asyncio.Queue()
        for client in self.clients:
            self.free.put_nowait(client)
        self.bounded = bounded  # at most `size` requests at once; else extra ones share clients
        self._next = 0

    @contextlib.asynccontextmanager
    async def borrow(self):
        if not self.bounded and self.free.empty():
            self._next = (self._next + 1) % len(self.clients)
            yield self.clients[self._next]
            return
        client = await self.free.get()
        try:
            yield client
        finally:
            self.free.put_nowait(client)

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.clients))


async def _stream_request(client, model: str, req: BenchRequest, sampling: RequestSampling = RequestSampling()) -> dict:
    start = time.perf_counter()
    token_times, tokens, error = [], 0, None
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "repetition_penalty": 1.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if sampling.schema is not None:  # --structured-output
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": sampling.schema}}
    try:
        async with client.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    # Parsing every token's JSON would make the load generator the bottleneck:
                    # only the usage and error events are parsed; a token event is one whose
                    # text is not empty (the server's compact JSON: `"text":"..."`).
                    if '"text":"' in line and '"text":""' not in line:
                        token_times.append(time.perf_counter())
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        error = event["error"]["message"]
                    elif event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error is None and not token_times:
        error = "no tokens streamed"
    return {"start": start, "end": end, "token_times": token_times, "output_tokens": tokens,
            "input_tokens": req.prompt_len, "error": error}


async def run_rate(base_url: str, requests: list, rate: float, seed: int,
                   max_concurrency: Optional[int] = None, *, model: str,
                   sampling: RequestSampling = RequestSampling()) -> tuple:
    """Like run.py's gRPC run_rate, over HTTP to `model`: (per-request records, duration, the
    run's (start, end) on time.monotonic)."""
    clients = ClientPool(base_url, max_concurrency or min(len(requests), 256), bounded=max_concurrency is not None)
    try:
        arrivals = poisson_arrivals(len(requests), rate, seed)
        window_start, t0 = time.monotonic(), time.perf_counter()
        results = await asyncio.gather(*(one_request(clients, model, r, a, t0, sampling) for r, a in zip(requests, arrivals)))
        duration, window_end = time.perf_counter() - t0, time.monotonic()
    finally:
        await clients.aclose()
    return results, duration, (window_start, window_end)
