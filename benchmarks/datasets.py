"""Benchmark workloads and the metrics reported over them.

Owns the request lists both benchmark modes of `benchmarks/run.py` send, so that qwenserve
and the transformers baseline (and every run recorded in docs/PERFORMANCE.md) see exactly
the same token ids:

  * `mixed_workload`: the standard workload. Request k draws, in this order, its input length
    uniform in [64, 1024], its output length uniform in [16, 512] and its input token ids
    uniform in [0, 151643) (ordinary tokens, no special ones) from one `random.Random(seed)`
    stream, seed 0. Drawing per request (not length arrays first) makes the first N requests
    of the 512 the same for any `--num-prompts N`, so smaller runs are prefixes of the full one.
  * `fixed_workload`: N requests of exactly `input_len` random ids and `output_len` outputs.
  * `random_workload`: N requests whose input and output lengths are each uniform in an
    inclusive (low, high) range (drawn per request, input then output, then the ids; a range
    of one value draws nothing, so fixed lengths give exactly `fixed_workload`'s requests).
  * `multi_tenant_workload`: tenants' system prompts shared by many requests (the case for
    prefix caching and cache-aware routing across replicas): first the system prompts (each's
    length uniform in `system_len`, then its ids), then per request its tenant (uniform), its
    suffix length (uniform in `input_len`), its output length, its suffix ids.
  * `jsonl_workload`: one {"prompt": text, "output_len": n} per line (or "prompt_token_ids"
    instead of "prompt"), tokenized once here.

All requests run with ignore_eos, so each produces exactly its output length; random ids
share no prefixes, so prefix caching cannot flatter the numbers (except multi-tenant's shared
system prompts, which are there to be cached).

Also here, so that each number has one definition: `poisson_arrivals` (serve mode send
times), `summarize` (mean, p50, p90, p99), `throughput` (offline) and `serve_metrics`.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

# Ids below the first special token (<|endoftext|> = 151643): every one is an ordinary token.
NUM_ORDINARY_TOKENS = 151643
MIXED_INPUT_RANGE = (64, 1024)
MIXED_OUTPUT_RANGE = (16, 512)
MIXED_NUM_REQUESTS = 512


@dataclass(frozen=True)
class RequestSampling:
    """How every request of a run samples (run.py's `--temperature`, `--top-p` and
    `--structured-output`): greedy and unconstrained unless asked. Every benchmark request
    ignores EOS, so outputs have the lengths the workload sets."""
    temperature: float = 0.0
    top_p: float = 1.0
    schema: Optional[dict] = None  # the JSON schema every request asks for


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _random_ids(rng: random.Random, n: int) -> list:
    return [rng.randrange(NUM_ORDINARY_TOKENS) for _ in range(n)]


def mixed_workload(num_requests: int = MIXED_NUM_REQUESTS, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        input_len = rng.randint(*MIXED_INPUT_RANGE)
        output_len = rng.randint(*MIXED_OUTPUT_RANGE)
        out.append(BenchRequest(_random_ids(rng, input_len), output_len))
    return out


def fixed_workload(num_requests: int, input_len: int, output_len: int, seed: int = 0) -> list:
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be >= 1, got {input_len}, {output_len}")
    rng = random.Random(seed)
    return [BenchRequest(_random_ids(rng, input_len), output_len) for _ in range(num_requests)]


def random_workload(num_requests: int, input_range: tuple, output_range: tuple, seed: int = 0) -> list:
    """Lengths uniform in the inclusive ranges; (n, n) is a fixed length."""
    for name, (low, high) in (("input", input_range), ("output", output_range)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} length range must satisfy 1 <= low <= high, got {low}:{high}")
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        input_len = rng.randint(*input_range) if input_range[0] < input_range[1] else input_range[0]
        output_len = rng.randint(*output_range) if output_range[0] < output_range[1] else output_range[0]
        out.append(BenchRequest(_random_ids(rng, input_len), output_len))
    return out


def multi_tenant_workload(num_requests: int, num_system_prompts: int, system_len: tuple, suffix_len: tuple,
                          output_len: tuple, seed: int = 0) -> list:
    """Requests = one of `num_system_prompts` shared system prompts + a suffix of their own
    (lengths inclusive ranges; see the module docstring for the draw order)."""
    for name, (low, high) in (("system", system_len), ("suffix", suffix_len), ("output", output_len)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} length range must satisfy 1 <= low <= high, got {low}:{high}")
    rng = random.Random(seed)
    systems = [_random_ids(rng, rng.randint(*system_len)) for _ in range(num_system_prompts)]
    out = []
    for _ in range(num_requests):
        tenant = rng.randrange(num_system_prompts)
        suffix = rng.randint(*suffix_len)
        output = rng.randint(*output_len)
        out.append(BenchRequest(systems[tenant] + _random_ids(rng, suffix), output))
    return out


def _as_range(length) -> tuple:
    return (length, length) if isinstance(length, int) else tuple(length)


def jsonl_workload(path: str, encode: Callable[[str], list], num_requests: Optional[int] = None) -> list:
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ids = list(item["prompt_token_ids"]) if "prompt_token_ids" in item else encode(item["prompt"])
                output_len = int(item["output_len"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": str, \"output_len\": int}} "
                                 f"({type(e).__name__}: {e})") from None
            if not ids or output_len < 1:
                raise ValueError(f"{path}:{lineno}: empty prompt or output_len < 1")
            out.append(BenchRequest(ids, output_len))
            if num_requests is not None and len(out) >= num_requests:
                break
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def build_workload(dataset: str, num_prompts: Optional[int], input_len, output_len,
                   seed: int, encode: Optional[Callable[[str], list]] = None, num_system_prompts: int = 16,
                   system_len=(1024, 2048)) -> list:
    """`dataset`: "random" (lengths: an int, or an inclusive (low, high) range each), "mixed"
    (the standard workload), "multi-tenant" (`input_len` is each request's own suffix) or a
    .jsonl path."""
    if dataset == "mixed":
        return mixed_workload(MIXED_NUM_REQUESTS if num_prompts is None else num_prompts, seed)
    if dataset == "multi-tenant":
        return multi_tenant_workload(256 if num_prompts is None else num_prompts, num_system_prompts,
                                     _as_range(system_len), _as_range(input_len), _as_range(output_len), seed)
    if dataset == "random":
        return random_workload(64 if num_prompts is None else num_prompts, _as_range(input_len),
                               _as_range(output_len), seed)
    if encode is None:
        raise ValueError("a JSONL dataset needs a tokenizer")
    return jsonl_workload(dataset, encode, num_prompts)


def describe(requests: Sequence[BenchRequest]) -> dict:
    ins = [r.prompt_len for r in requests]
    outs = [r.output_len for r in requests]
    return {"num_requests": len(requests), "total_input_tokens": sum(ins), "total_output_tokens": sum(outs),
            "input_len_min": min(ins), "input_len_max": max(ins), "input_len_mean": sum(ins) / len(ins),
            "output_len_min": min(outs), "output_len_max": max(outs), "output_len_mean": sum(outs) / len(outs)}


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list:
    """Send times in seconds from the start: exponential gaps of mean 1/rate; rate inf: all at 0."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on pre-sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict:
    """mean, p50, p90, p99 (NaN-free: an empty list gives None for each, which JSON keeps)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(values)
    return {"mean": sum(s) / len(s), "p50": percentile(s, 50), "p90": percentile(s, 90),
            "p99": percentile(s, 99)}


def throughput(requests: list, elapsed: float, output_tokens: int) -> dict:
    """Offline: requests, prompt + output tokens and output tokens, each per second of wall time."""
    input_tokens = sum(r.prompt_len for r in requests)
    return {"elapsed_s": elapsed, "requests_per_s": len(requests) / elapsed,
            "total_tokens_per_s": (input_tokens + output_tokens) / elapsed,
            "output_tokens_per_s": output_tokens / elapsed, "output_tokens": output_tokens}


def serve_metrics(results: list, duration: float, slo_ttft, slo_tpot) -> dict:
    """Serve mode, from per-request records {start, end, token_times (one per streamed message
    with tokens), output_tokens, input_tokens, error}; times in seconds, latencies in ms.

    TTFT: start -> first token. TPOT: (last - first token) / (output tokens - 1). ITL: gaps
    between streamed messages. E2E: start -> end of stream. Goodput: requests/s meeting every
    SLO given (None without SLOs). Throughputs count completed requests over `duration`.
    """
    ok = [r for r in results if r["error"] is None]
    ttft, tpot, itl, e2e, good = [], [], [], [], 0
    for r in ok:
        times = r["token_times"]
        t_first = 1e3 * (times[0] - r["start"])
        ttft.append(t_first)
        e2e.append(1e3 * (r["end"] - r["start"]))
        itl.extend(1e3 * (b - a) for a, b in zip(times, times[1:]))  # one gap per streamed message
        t_per_token = 1e3 * (times[-1] - times[0]) / (r["output_tokens"] - 1) if r["output_tokens"] > 1 else None
        if t_per_token is not None:
            tpot.append(t_per_token)
        if (slo_ttft is None or t_first <= slo_ttft) and (slo_tpot is None or (t_per_token or 0.0) <= slo_tpot):
            good += 1
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["input_tokens"] for r in ok)
    errors = sorted({r["error"] for r in results if r["error"]})
    return {"completed": len(ok), "failed": len(results) - len(ok), "errors": errors[:5], "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
            "total_token_throughput": (in_tokens + out_tokens) / duration,
            "goodput": good / duration if (slo_ttft is not None or slo_tpot is not None) else None,
            "ttft_ms": summarize(ttft), "tpot_ms": summarize(tpot), "itl_ms": summarize(itl),
            "e2el_ms": summarize(e2e)}
