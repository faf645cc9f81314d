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
    # Scrape-time values from the stats, per engine core (one here: replica "0"); the front
    # end's pending adds apart.
    assert value(after, "qwenserve:num_requests_waiting", replica="0") == 1
    assert value(after, "qwenserve:num_requests_pending") == 2
    assert value(after, "qwenserve:engine_core_up", replica="0") == 1
    assert value(after, "qwenserve:kv_cache_usage_perc", replica="0") == 0.25
    assert value(after, "qwenserve:prefix_cache_queries_total", replica="0") == 40
    assert value(after, "qwenserve:prefix_cache_hits_total", replica="0") == 16
    assert value(after, "qwenserve:num_preemptions_total", replica="0") == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "qwenserve.requests"]
    assert len(lines) == 3
    assert lines[0].startswith(f"request one (grpc) finished: prompt_tokens={prompt_tokens} completion_tokens=3 ttft=")
    assert lines[0].endswith("finish=stop") and "queue=0.010s" in lines[0]
    assert lines[1].startswith("request two (http)")
    assert "completion_tokens=4" in lines[1] and lines[1].endswith("finish=length,length")
    assert lines[2].endswith("finish=abort")


def test_inter_token_latency_counts_every_token_but_each_completions_first_when_deltas_merge():
    """A consumer that fell behind gets merged deltas (`merge_deltas`), the first one included:
    the histogram still has one observation per token after each completion's first (the HTTP
    server test's exact count was flaky under load before the first delta was counted)."""
    from qwenserve.frontend.engine_client import Delta
    from qwenserve.server.metrics import _RequestRecord

    metrics = ServerMetrics(ScriptedEngineClient(lambda call: ["a"]))
    record = _RequestRecord("r", n=2, start=10.0)

    def delta(index, token_ids):
        return Delta(index=index, text="x", token_ids=tuple(token_ids), finish_reason=None, prompt_tokens=3,
                     completion_tokens=len(token_ids))

    record.observe([delta(0, [1, 2, 3]), delta(1, [4])], now=11.0, metrics=metrics)  # first deltas: 3 and 1 tokens
    record.observe([delta(0, [5, 6]), delta(1, [7])], now=12.0, metrics=metrics)  # merged again: 2 gaps of 0.5 s
    scrape = samples(metrics)
    assert value(scrape, "qwenserve:inter_token_latency_seconds_count") == (5 - 1) + (2 - 1)
    assert value(scrape, "qwenserve:inter_token_latency_seconds_sum") == pytest.approx(2 * 0.5 + 1.0)
    assert value(scrape, "qwenserve:generation_tokens_total") == 7


def test_engine_gauges_carry_the_replica_label_per_engine_core():
    """Several cores: one series each; a failed core reads up 0 and holds no requests or blocks,
    and keeps its counters."""
    engine = ScriptedEngineClient()
    core = {"num_waiting": 2, "num_used_blocks": 10, "num_total_blocks": 40, "prefix_cache_query_tokens": 100,
            "prefix_cache_hit_tokens": 60, "num_preemptions": 0}
    engine.replica_stats = lambda: [dict(core, replica=0, alive=True, num_running=3),
                                    dict(core, replica=1, alive=False, num_running=0, num_waiting=0,
                                         num_used_blocks=0, num_total_blocks=0)]
    scrape = samples(ServerMetrics(engine))
    assert value(scrape, "qwenserve:num_requests_running", replica="0") == 3
    assert value(scrape, "qwenserve:num_requests_waiting", replica="0") == 2
    assert value(scrape, "qwenserve:kv_cache_usage_perc", replica="0") == 0.25
    assert value(scrape, "qwenserve:engine_core_up", replica="0") == 1
    assert value(scrape, "qwenserve:engine_core_up", replica="1") == 0
    assert value(scrape, "qwenserve:kv_cache_usage_perc", replica="1") == 0.0
    assert value(scrape, "qwenserve:prefix_cache_hits_total", replica="1") == 60
    assert ("qwenserve:num_requests_running", frozenset()) not in scrape  # no unlabelled sum beside them


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
