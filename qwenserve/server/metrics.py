"""Prometheus metrics and per-request log lines, the same for every front end.

Owns the `qwenserve:` metrics (vLLM's names after the prefix) and how they are measured:

- per request, by `MeteredEngineClient`, a decorator of the `EngineClient` that each front end
  (gRPC, HTTP) is handed: it watches every `generate` from the call to the last delta;
- per engine step, through `EngineClient.on_step` (tokens per iteration);
- at scrape time, from `EngineClient.replica_stats()` (queues, KV usage, prefix cache,
  preemptions: one series per engine core, label `replica`, "0" with one core) and
  `EngineClient.stats()` (the front end's pending requests).

Definitions. Time to first token: from the call to the first delta that carries a token (for
n > 1: any completion's). Inter-token latency: between two deltas of one completion that carry
tokens. End-to-end: from the call to the last delta (or the moment the caller left). Queue time:
the engine's, from its accepting the request to first scheduling it (`Delta.queue_time`).
request_success_total counts completions (n per request) by finish reason, "abort" included
(a client that disconnects or cancels aborts its request, queued or running); a request refused
before it started (bad input, queue full) is neither counted nor logged, and one the engine
failed under is logged with finish "error" but not counted. prefix_cache_{queries,hits}_total count prompt
tokens, as vLLM's do. num_requests_waiting is a core's queue; num_requests_pending the requests
the front end holds before any core has them (input processing); engine_core_up is 1 while a
core serves and 0 once it has failed (a failed core's occupancy gauges read 0, its counters keep
their last values).

The request log is one INFO line per finished request on the `qwenserve.requests` logger:

    request chatcmpl-9f2c (http) finished: prompt_tokens=12 completion_tokens=8 ttft=0.052s
    e2e=0.310s queue=0.001s finish=stop
"""
from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Callable, Optional

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from qwenserve.frontend.engine_client import Delta, EngineClient, StepStats
from qwenserve.sampling_params import SamplingParams

PREFIX = "qwenserve:"
request_logger = logging.getLogger("qwenserve.requests")

# Seconds; the low end resolves a GPU's decode steps, the high end long queues and generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    """The registry /metrics exposes, fed by the engine's stats and the metered clients."""

    def __init__(self, engine: EngineClient):
        prometheus_client.disable_created_metrics()  # no *_created series beside every counter
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of started requests.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(f"{PREFIX}request_success", "Finished completions by finish reason.",
                                       ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram(f"{PREFIX}time_to_first_token_seconds",
                                             "Seconds from the call to the first token.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(f"{PREFIX}inter_token_latency_seconds",
                                             "Seconds between a completion's consecutive tokens.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(f"{PREFIX}e2e_request_latency_seconds",
                                             "Seconds from the call to the last token.",
                                             buckets=_REQUEST_BUCKETS, registry=r)
        self.request_queue_time = Histogram(f"{PREFIX}request_queue_time_seconds",
                                            "Seconds a request waited in the engine before it was scheduled.",
                                            buckets=_REQUEST_BUCKETS, registry=r)
        self.iteration_tokens = Histogram(f"{PREFIX}iteration_tokens_total", "Tokens computed per engine step.",
                                          buckets=_ITERATION_BUCKETS, registry=r)
        r.register(_EngineStatsCollector(engine))
        engine.on_step(self._on_step)

    def _on_step(self, stats: StepStats) -> None:
        self.iteration_tokens.observe(stats.num_tokens)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return prometheus_client.generate_latest(self.registry)


class _EngineStatsCollector:
    """Gauges and counters read from the engine's stats when /metrics is scraped: one series per
    engine core (label `replica`), and the front end's pending requests."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    def describe(self):
        return []  # nothing to check at registration: the families are built per scrape

    def collect(self):
        replicas = self.engine.replica_stats()
        per_replica = [
            (GaugeMetricFamily, "engine_core_up", "1 while the engine core serves, 0 once it failed.",
             lambda r: 1 if r.get("alive", True) else 0),
            (GaugeMetricFamily, "num_requests_running", "Completions the engine core is running.",
             lambda r: r.get("num_running", 0)),
            (GaugeMetricFamily, "num_requests_waiting", "Completions waiting in the engine core's queue.",
             lambda r: r.get("num_waiting", 0)),
            (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of the core's KV cache blocks in use (1 = all).",
             lambda r: r.get("num_used_blocks", 0) / r["num_total_blocks"] if r.get("num_total_blocks") else 0.0),
            (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             lambda r: r.get("prefix_cache_query_tokens", 0)),
            (CounterMetricFamily, "prefix_cache_hits", "Prompt tokens served from the prefix cache.",
             lambda r: r.get("prefix_cache_hit_tokens", 0)),
            (CounterMetricFamily, "num_preemptions", "Preemptions of running requests.",
             lambda r: r.get("num_preemptions", 0)),
        ]
        for kind, name, documentation, value_of in per_replica:
            family = kind(f"{PREFIX}{name}", documentation, labels=["replica"])
            for replica in replicas:
                family.add_metric([str(replica["replica"])], value_of(replica))
            yield family
        yield GaugeMetricFamily(f"{PREFIX}num_requests_pending", "Requests being processed by the front end, "
                                "not yet handed to an engine core.", value=self.engine.stats().get("num_pending", 0))


class _RequestRecord:
    """What one request did, as its deltas show it."""

    def __init__(self, request_id: str, n: int, start: float):
        self.request_id, self.n, self.start = request_id, n, start
        self.first_token: Optional[float] = None
        self.last_token: dict[int, float] = {}
        self.finish_reasons: dict[int, str] = {}
        self.completion_tokens = 0
        self.prompt_tokens: Optional[int] = None
        self.queue_time: Optional[float] = None
        self.started = False

    def observe(self, deltas: list[Delta], now: float, metrics: ServerMetrics) -> None:
        self.started = True
        for delta in deltas:
            if self.prompt_tokens is None:
                self.prompt_tokens = delta.prompt_tokens
                metrics.prompt_tokens.inc(delta.prompt_tokens)
            if self.queue_time is None and delta.queue_time is not None:
                self.queue_time = delta.queue_time
                metrics.request_queue_time.observe(delta.queue_time)
            if delta.token_ids:
                if self.first_token is None:
                    self.first_token = now
                    metrics.time_to_first_token.observe(now - self.start)
                previous = self.last_token.get(delta.index)
                # A delta merged from k steps (a consumer that fell behind) is k tokens: k
                # intervals of the mean gap, so the histogram counts every token but each
                # completion's first. A completion's first delta may hold more than its first
                # token: the others arrived with it, a gap of 0.
                if previous is not None:
                    gap, num_gaps = (now - previous) / len(delta.token_ids), len(delta.token_ids)
                else:
                    gap, num_gaps = 0.0, len(delta.token_ids) - 1
                for _ in range(num_gaps):
                    metrics.inter_token_latency.observe(gap)
                self.last_token[delta.index] = now
                self.completion_tokens += len(delta.token_ids)
                metrics.generation_tokens.inc(len(delta.token_ids))
            if delta.finish_reason:
                self.finish_reasons[delta.index] = delta.finish_reason


class MeteredEngineClient(EngineClient):
    """The `EngineClient` a front end uses: every `generate` is measured and, when it ends,
    logged; everything else goes straight to the engine client it wraps."""

    def __init__(self, inner: EngineClient, metrics: ServerMetrics, frontend: str, log_requests: bool = True):
        self.inner, self.metrics, self.frontend, self.log_requests = inner, metrics, frontend, log_requests
        self.tokenizer = inner.tokenizer
        self.generation_config = inner.generation_config
        self.max_model_len = inner.max_model_len
        self.info = inner.info

    async def generate(self, request_id: str, *, params: SamplingParams, **inputs) -> AsyncIterator[list[Delta]]:
        record = _RequestRecord(request_id, params.n, time.monotonic())
        stream = self.inner.generate(request_id, params=params, **inputs)
        failed = False
        try:
            async for deltas in stream:
                record.observe(deltas, time.monotonic(), self.metrics)
                yield deltas
        except Exception:
            failed = True
            raise
        finally:
            await stream.aclose()  # the caller left early: the engine aborts the request now
            if record.started or not failed:  # failed before any delta: refused, not a request
                self._finish(record, failed)

    def _finish(self, record: _RequestRecord, failed: bool) -> None:
        end = time.monotonic()
        reasons = [record.finish_reasons.get(i, "error" if failed else "abort") for i in range(record.n)]
        if not failed:
            for reason in reasons:
                self.metrics.request_success.labels(finished_reason=reason).inc()
            self.metrics.e2e_request_latency.observe(end - record.start)
        if self.log_requests:
            ttft = f"{record.first_token - record.start:.3f}s" if record.first_token is not None else "-"
            queue = f"{record.queue_time:.3f}s" if record.queue_time is not None else "-"
            request_logger.info(
                "request %s (%s) finished: prompt_tokens=%d completion_tokens=%d ttft=%s e2e=%.3fs queue=%s "
                "finish=%s", record.request_id, self.frontend, record.prompt_tokens or 0,
                record.completion_tokens, ttft, end - record.start, queue, ",".join(reasons))

    # Everything else is the wrapped client's.
    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def encode(self, text: str) -> list[int]:
        return await self.inner.encode(text)

    def stats(self) -> dict:
        return self.inner.stats()

    def replica_stats(self) -> list[dict]:
        return self.inner.replica_stats()

    def on_step(self, callback: Callable[[StepStats], None]) -> None:
        self.inner.on_step(callback)

    @property
    def dead_reason(self) -> Optional[str]:
        return self.inner.dead_reason

    @property
    def num_active(self) -> int:
        return self.inner.num_active

    def on_failure(self, callback: Callable[[str], None]) -> None:
        self.inner.on_failure(callback)

    def stop_accepting(self) -> None:
        self.inner.stop_accepting()

    async def abort_all(self) -> None:
        await self.inner.abort_all()

    async def close(self) -> None:
        await self.inner.close()
