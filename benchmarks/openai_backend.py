"""`benchmarks/run.py serve --backend openai`: the same workload as over gRPC, through the
OpenAI-compatible HTTP API (streamed /v1/completions with the prompt's token ids), with the
`openai` package as the client, as vLLM's serving benchmark measures its OpenAI server.

Each request's record has the fields `datasets.serve_metrics` reads. A streamed chunk is one
engine step of text; its arrival time is a token time (a step whose text is held back, e.g. half
a UTF-8 character, sends no chunk, as over gRPC it sends a message without text). The output
token count is the server's (`stream_options.include_usage`).
"""
from __future__ import annotations

import asyncio
import os
import time

from benchmarks.datasets import BenchRequest, poisson_arrivals


def _openai():
    try:
        import openai
    except ImportError:
        raise SystemExit("--backend openai needs the openai package: pip install openai "
                         "(or pip install -e '.[bench]')") from None
    return openai


def _client(base_url: str):
    # $QWENSERVE_API_KEY when the server wants a key; any string otherwise (the SDK insists on one).
    return _openai().AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", max_retries=0, timeout=None,
                                 api_key=os.environ.get("QWENSERVE_API_KEY") or "unused")


def model_info(base_url: str) -> dict:
    """The served model, from GET /v1/models."""
    async def get():
        async with _client(base_url) as client:
            return (await client.models.list()).data[0].model_dump()

    return asyncio.run(get())


async def one_request(client, model: str, req: BenchRequest, send_at: float, t0: float) -> dict:
    openai = _openai()
    await asyncio.sleep(max(0.0, t0 + send_at - time.perf_counter()))
    start = time.perf_counter()
    token_times, tokens, error = [], 0, None
    try:
        stream = await client.completions.create(
            model=model, prompt=req.prompt_token_ids, max_tokens=req.output_len, temperature=0.0, top_p=1.0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"repetition_penalty": 1.0, "ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                token_times.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error is None and not token_times:
        error = "no tokens streamed"
    return {"start": start, "end": end, "token_times": token_times, "output_tokens": tokens,
            "input_tokens": req.prompt_len, "error": error}


async def run_rate(base_url: str, requests: list, rate: float, seed: int, *, model: str) -> tuple:
    """Like run.py's gRPC run_rate, over HTTP to `model`."""
    async with _client(base_url) as client:
        arrivals = poisson_arrivals(len(requests), rate, seed)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, model, r, a, t0) for r, a in zip(requests, arrivals)))
    return results, time.perf_counter() - t0
