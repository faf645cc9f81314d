"""`qwenserve/server/metrics.py` against a scripted engine client: the counters and histograms
move by what known requests did, the scrape-time gauges show the engine's stats, and each
finished request is one log line (the server's end-to-end check is in test_http_server.py)."""
import asyncio
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_engine import ScriptedEngineClient  # tests/ is on sys.path
from qwenserve.frontend.engine_client import QueueFull
from qwenserve.sampling_params import SamplingParams
from qwenserve.server.metrics import MeteredEngineClient, ServerMetrics


def samples(metrics: ServerMetrics) -> dict:
    """{(name, frozenset(labels)): value} of one scrape, parsed by prometheus_client's parser."""
    text = metrics.exposition().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape, name, **labels):
    return scrape.get((name, frozenset(labels.items())), 0.0)


async def consume(client, request_id, params, leave_after=None, **inputs):
    deltas = []
    stream = client.generate(request_id, params=params, **inputs)
    try:
        async for step in stream:
            deltas.extend(step)
            if leave_after is not None and len(deltas) >= leave_after:
                break
    finally:
        await stream.aclose()
    return deltas


def test_counters_histograms_and_gauges_after_known_requests(caplog):
    engine = ScriptedEngineClient(lambda call: ["a", "b", "c"])
    metrics = ServerMetrics(engine)
    grpc, http = (MeteredEngineClient(engine, metrics, name) for name in ("grpc", "http"))
    before = samples(metrics)
    assert value(before, "qwenserve:request_success_total", finished_reason="stop") == 0

    async def run():
        await consume(grpc, "one", SamplingParams(max_tokens=10), prompt="hi")  # 3 tokens, stop
        await consume(http, "two", SamplingParams(n=2, max_tokens=2), prompt="hi")  # 2 x 2 tokens, length
        await consume(http, "three", SamplingParams(max_tokens=10), leave_after=1, prompt="hi")  # left: abort

    with caplog.at_level(logging.INFO, logger="qwenserve.requests"):
        asyncio.run(run())
    after = samples(metrics)
    prompt_tokens = len(engine.tokenizer.encode("hi"))
    assert value(after, "qwenserve:prompt_tokens_total") == 3 * prompt_tokens
    assert value(after, "qwenserve:generation_tokens_total") == 3 + 4 + 1
    assert value(after, "qwenserve:request_success_total", finished_reason="stop") == 1
    assert value(after, "qwenserve:request_success_total", finished_reason="length") == 2
    assert value(after, "qwenserve:request_success_total", finished_reason="abort") == 1
    assert value(after, "qwenserve:time_to_first_token_seconds_count") == 3
    assert value(after, "qwenserve:e2e_request_latency_seconds_count") == 3
    assert value(after, "qwenserve:request_queue_time_seconds_count") == 3
    assert value(after, "qwenserve:request_queue_time_seconds_sum") == pytest.approx(0.03)
    # Inter-token gaps: 2 in the first request, 1 per completion of the second, none in the third.
    assert value(after, "qwenserve:inter_token_latency_seconds_count") == 2 + 2
    # One step observation per step the scripted engine ran (3 + 2 + 2 of the third before it left).
    assert value(after, "qwenserve:iteration_tokens_total_count") >= 6
    # Scrape-time values from stats(): waiting includes the front end's pending adds.
    assert value(after, "qwenserve:num_requests_waiting") == 3
    assert value(after, "qwenserve:kv_cache_usage_perc") == 0.25
    assert value(after, "qwenserve:prefix_cache_queries_total") == 40
    assert value(after, "qwenserve:prefix_cache_hits_total") == 16
    assert value(after, "qwenserve:num_preemptions_total") == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "qwenserve.requests"]
    assert len(lines) == 3
    assert lines[0].startswith(f"request one (grpc) finished: prompt_tokens={prompt_tokens} completion_tokens=3 ttft=")
    assert lines[0].endswith("finish=stop") and "queue=0.010s" in lines[0]
    assert lines[1].startswith("request two (http)")
    assert "completion_tokens=4" in lines[1] and lines[1].endswith("finish=length,length")
    assert lines[2].endswith("finish=abort")


def test_refused_requests_are_not_counted_and_the_log_can_be_switched_off(caplog):
    engine = ScriptedEngineClient(lambda call: QueueFull("waiting queue is full"))
    metrics = ServerMetrics(engine)
    quiet = MeteredEngineClient(engine, metrics, "http", log_requests=False)

    async def run():
        with pytest.raises(QueueFull):
            await consume(quiet, "refused", SamplingParams(), prompt="hi")
        engine.script = lambda call: ["x"]
        await consume(quiet, "fine", SamplingParams(), prompt="hi")

    with caplog.at_level(logging.INFO, logger="qwenserve.requests"):
        asyncio.run(run())
    scrape = samples(metrics)
    assert value(scrape, "qwenserve:request_success_total", finished_reason="stop") == 1
    assert value(scrape, "qwenserve:e2e_request_latency_seconds_count") == 1
    assert not [r for r in caplog.records if r.name == "qwenserve.requests"]


def test_the_metered_client_passes_everything_else_through():
    engine = ScriptedEngineClient()
    metered = MeteredEngineClient(engine, ServerMetrics(engine), "grpc")
    assert metered.info is engine.info and metered.tokenizer is engine.tokenizer
    assert metered.stats() == engine.stats() and metered.num_active == 0 and metered.dead_reason is None
    metered.stop_accepting()
    assert engine.accepting is False
