"""Smoke tests of the benchmark harness (`benchmarks/run.py`, `benchmarks/datasets.py`, `benchmarks/kernels.py`).

Each mode runs as a user runs it (a subprocess) on the built-in tiny model for a few seconds,
and the test checks that the JSON holds every metric with sane values. Nothing here is timed:
the numbers of a 2-core CI machine mean nothing, only their presence and consistency do.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed with the package

from benchmarks import datasets  # noqa: E402
ENGINE = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "32MiB"]


def run_bench(tmp_path, *args, timeout=600) -> dict:
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), *args, *ENGINE, "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_summary(s: dict) -> None:
    assert set(s) == {"mean", "p50", "p90", "p99"}
    assert all(isinstance(v, float) and v >= 0 for v in s.values()), s
    assert s["p50"] <= s["p90"] <= s["p99"]


def check_throughput(m: dict, workload: dict) -> None:
    for key in ("elapsed_s", "requests_per_s", "total_tokens_per_s", "output_tokens_per_s"):
        assert m[key] > 0, (key, m)
    assert m["output_tokens"] == workload["total_output_tokens"]
    assert m["requests_per_s"] * m["elapsed_s"] == pytest.approx(workload["num_requests"])
    assert m["total_tokens_per_s"] > m["output_tokens_per_s"]


def check_environment(env: dict) -> None:
    for key in ("date", "device", "commit", "torch", "command"):
        assert key in env
    assert env["command"].startswith("python benchmarks/run.py")


# ---------------------------------------------------------------- workloads and metrics
def test_mixed_workload_is_the_standard_one():
    full = datasets.mixed_workload()
    assert len(full) == 512
    assert all(64 <= r.prompt_len <= 1024 and 16 <= r.output_len <= 512 for r in full)
    assert all(0 <= t < datasets.NUM_ORDINARY_TOKENS for r in full[:8] for t in r.prompt_token_ids)
    # Smaller runs are prefixes of the full workload, and the workload never changes with the run.
    assert datasets.mixed_workload(16) == full[:16]
    assert datasets.mixed_workload(16, seed=1) != full[:16]
    assert len({r.prompt_len for r in full}) > 100
    assert datasets.build_workload("mixed", 3, 1, 1, seed=0) == full[:3]
    assert datasets.build_workload("mixed", None, 1, 1, seed=0) == full


def test_random_workload_length_ranges():
    # A range of one value draws no length: the same requests as fixed_workload.
    assert datasets.random_workload(5, (16, 16), (8, 8), seed=3) == datasets.fixed_workload(5, 16, 8, seed=3)
    reqs = datasets.random_workload(400, (128, 512), (4, 6), seed=0)
    assert {r.output_len for r in reqs} == {4, 5, 6}
    assert min(r.prompt_len for r in reqs) >= 128 and max(r.prompt_len for r in reqs) <= 512
    assert len({r.prompt_len for r in reqs}) > 200
    assert (datasets.build_workload("random", 3, (128, 512), 4, seed=0)
            == datasets.random_workload(3, (128, 512), (4, 4)))
    with pytest.raises(ValueError, match="input length range"):
        datasets.random_workload(1, (5, 3), (1, 1))


def test_multi_tenant_workload_shares_system_prompts():
    reqs = datasets.multi_tenant_workload(200, 4, (40, 60), (5, 9), (3, 3), seed=0)
    systems = {}
    for r in reqs:
        head = tuple(r.prompt_token_ids[:40])   # every system prompt is at least 40 tokens
        systems.setdefault(head, []).append(r)
    assert len(systems) == 4                    # four tenants, each shared by many requests
    assert min(len(group) for group in systems.values()) > 20
    for group in systems.values():              # a tenant's requests share its whole system prompt
        common = os.path.commonprefix([r.prompt_token_ids for r in group])
        assert 40 <= len(common) <= 60 and all(5 <= r.prompt_len - len(common) <= 9 for r in group)
    assert all(45 <= r.prompt_len <= 69 and r.output_len == 3 for r in reqs)
    assert len({tuple(r.prompt_token_ids) for r in reqs}) == 200   # each its own suffix
    assert datasets.build_workload("multi-tenant", 200, (5, 9), 3, seed=0, num_system_prompts=4,
                                   system_len=(40, 60)) == reqs
    with pytest.raises(ValueError, match="system length range"):
        datasets.multi_tenant_workload(1, 1, (9, 3), (1, 1), (1, 1))


def test_length_range_flag():
    from benchmarks.run import length_range
    assert length_range("128") == (128, 128) and length_range("128:512") == (128, 512)
    for bad in ("0", "5:3", "a:b", "1:2:3", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="LOW:HIGH"):
            length_range(bad)


def test_max_concurrency_flag(capsys):
    from benchmarks.run import build_parser
    assert build_parser().parse_args(["serve", "--max-concurrency", "256"]).max_concurrency == 256
    with pytest.raises(SystemExit):  # 0 slots would never send a request
        build_parser().parse_args(["serve", "--max-concurrency", "0"])
    assert "argument --max-concurrency: must be an integer >= 1" in capsys.readouterr().err


def test_request_sampling_flags_reach_every_backend():
    """--temperature, --top-p and --structured-output become the same request everywhere: the
    offline/decode SamplingParams, the gRPC call and the HTTP body (greedy when not given)."""
    import asyncio

    from benchmarks import openai_backend
    from benchmarks.grammar_walk import BENCH_STRUCTURES
    from benchmarks.run import _stream_request, build_parser, request_sampling, sampling_params

    assert request_sampling(build_parser().parse_args(["offline"])) == datasets.RequestSampling(0.0, 1.0, None)
    sampling = request_sampling(build_parser().parse_args(
        ["serve", "--temperature", "0.8", "--top-p", "0.9", "--structured-output", "records"]))
    assert sampling == datasets.RequestSampling(0.8, 0.9, BENCH_STRUCTURES["records"])
    params = sampling_params(sampling, 7)
    assert (params.max_tokens, params.temperature, params.top_p, params.ignore_eos) == (7, 0.8, 0.9, True)
    assert params.structured_output.json_schema == BENCH_STRUCTURES["records"]
    request = datasets.BenchRequest([1, 2, 3], 7)

    class GrpcClient:
        async def generate_stream(self, **kwargs):
            self.kwargs = kwargs
            yield argparse.Namespace(token_ids=[5])

    grpc_client = GrpcClient()
    assert asyncio.run(_stream_request(grpc_client, request, sampling))["error"] is None
    assert {k: grpc_client.kwargs[k] for k in ("temperature", "top_p", "json_schema", "max_tokens")} == {
        "temperature": 0.8, "top_p": 0.9, "json_schema": BENCH_STRUCTURES["records"], "max_tokens": 7}

    class HttpResponse:
        status_code = 200

        async def aiter_lines(self):
            yield 'data: {"choices":[{"text":"x"}]}'
            yield 'data: {"choices":[],"usage":{"completion_tokens":1}}'

    class HttpClient:
        def stream(self, method, path, json):
            self.body = json
            response = HttpResponse()

            class Context:
                async def __aenter__(self):
                    return response

                async def __aexit__(self, *exc):
                    return False
            return Context()

    http_client = HttpClient()
    assert asyncio.run(openai_backend._stream_request(http_client, "qwen", request, sampling))["error"] is None
    assert (http_client.body["temperature"], http_client.body["top_p"]) == (0.8, 0.9)
    assert http_client.body["response_format"]["json_schema"]["schema"] == BENCH_STRUCTURES["records"]


def test_jsonl_workload(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 5}\n\n{"prompt_token_ids": [1, 2], "output_len": 3}\n')
    reqs = datasets.jsonl_workload(str(path), lambda text: [ord(c) for c in text])
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(11, 5), (2, 3)]
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="w.jsonl:1"):
        datasets.jsonl_workload(str(path), list)


def test_poisson_arrivals_and_summaries():
    times = datasets.poisson_arrivals(2000, rate=10.0, seed=0)
    assert times == sorted(times) and times[0] == 0.0
    assert 2000 / times[-1] == pytest.approx(10.0, rel=0.1)
    assert datasets.poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    s = datasets.summarize([float(i) for i in range(1, 101)])
    assert s["mean"] == 50.5 and s["p50"] == 50.5 and s["p99"] == pytest.approx(99.01)
    assert datasets.summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_serve_metrics_definitions():
    # Two requests started at 0: one streams 4 tokens in 3 messages, one fails.
    ok = {"start": 0.0, "end": 0.5, "token_times": [0.1, 0.2, 0.4], "output_tokens": 4, "input_tokens": 10,
          "error": None}
    bad = dict(ok, token_times=[], output_tokens=0, error="UNAVAILABLE: down")
    m = datasets.serve_metrics([ok, bad], duration=1.0, slo_ttft=100.0, slo_tpot=50.0)
    assert (m["completed"], m["failed"], m["errors"]) == (1, 1, ["UNAVAILABLE: down"])
    assert m["ttft_ms"]["mean"] == pytest.approx(100.0)
    assert m["tpot_ms"]["mean"] == pytest.approx(100.0)  # (0.4 - 0.1) s / 3 tokens
    assert m["itl_ms"]["mean"] == pytest.approx(150.0)  # gaps of 100 and 200 ms between messages
    assert m["e2el_ms"]["mean"] == pytest.approx(500.0)
    assert m["goodput"] == 0.0  # TPOT 100 ms > 50 ms SLO
    assert datasets.serve_metrics([ok], 1.0, None, None)["goodput"] is None
    assert datasets.serve_metrics([ok], 1.0, 150.0, 120.0)["goodput"] == 1.0


# ---------------------------------------------------------------- the modes, end to end
def test_offline_with_baseline(tmp_path):
    result, stdout = run_bench(tmp_path, "offline", "--num-prompts", "4", "--input-len", "16",
                               "--output-len", "8", "--baseline-batch-size", "2")
    workload = result["workload"]
    assert (workload["num_requests"], workload["total_input_tokens"], workload["total_output_tokens"]) == (4, 64, 32)
    check_environment(result["environment"])
    check_throughput(result["qwenserve"], workload)
    check_throughput(result["baseline"], workload)
    assert result["baseline"]["batch_size"] == 2
    assert result["speedup"] == pytest.approx(result["baseline"]["elapsed_s"] / result["qwenserve"]["elapsed_s"])
    assert "qwenserve / transformers:" in stdout


def test_offline_jsonl_without_baseline(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "The capital of Iceland is", "output_len": 4}\n'
                    '{"prompt_token_ids": [1, 2, 3], "output_len": 2}\n')
    result, stdout = run_bench(tmp_path, "offline", "--dataset", str(path), "--no-baseline")
    workload = result["workload"]
    assert (workload["num_requests"], workload["total_input_tokens"], workload["total_output_tokens"]) == (2, 8, 6)
    check_throughput(result["qwenserve"], workload)
    assert result["baseline"] is None and result["speedup"] is None
    assert "transformers" not in stdout


def test_offline_without_transformers_says_how_to_get_it(tmp_path):
    """After the README's first install (no transformers), `offline` runs qwenserve's side and
    says how to get the baseline instead of ending in a traceback."""
    out = tmp_path / "result.json"
    argv = ["benchmarks/run.py", "offline", "--num-prompts", "2", "--input-len", "8", "--output-len", "4", *ENGINE,
            "--json", str(out)]
    script = ("import runpy, sys; sys.modules['transformers'] = None; "  # as if it were not installed
              f"sys.argv = {argv!r}; runpy.run_path('benchmarks/run.py', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "no transformers baseline: the transformers package is not installed (pip install -e '.[bench]'" \
        in proc.stdout.splitlines()[0]  # before the run, not after it
    result = json.loads(out.read_text())
    assert result["baseline"] is None and result["qwenserve"]["output_tokens"] == 8


def test_decode_against_floor(tmp_path):
    result, _ = run_bench(tmp_path, "decode", "--random-weights", "--preset", "tiny", "--input-len", "8",
                          "--output-len", "6", "--copy-bytes", "16MiB")
    for key in ("weight_bytes_per_step", "copy_bandwidth_GBps", "floor_tokens_per_s_per_seq", "ms_per_step",
                "tokens_per_s_per_seq", "output_tokens_per_s", "fraction_of_floor"):
        assert result[key] > 0, key
    assert result["decode_steps"] == 5  # the first token comes from the prefill step
    assert result["floor_tokens_per_s_per_seq"] == pytest.approx(
        result["copy_bandwidth_GBps"] * 1e9 / result["weight_bytes_per_step"])


def test_serve_starts_a_server(tmp_path):
    result, stdout = run_bench(tmp_path, "serve", "--num-prompts", "4", "--input-len", "16", "--output-len", "6",
                               "--request-rate", "inf", "50", "--slo-ttft", "60000", "--slo-tpot", "60000",
                               "--max-model-len", "256")
    check_environment(result["environment"])
    assert result["model_info"]["max_model_len"] == 256
    assert [r["request_rate"] for r in result["runs"]] == ["inf", 50.0]
    for run in result["runs"]:
        m = run["metrics"]
        assert (m["completed"], m["failed"]) == (4, 0), m["errors"]
        for key in ("duration_s", "request_throughput", "output_token_throughput", "total_token_throughput"):
            assert m[key] > 0, key
        assert m["output_token_throughput"] * m["duration_s"] == pytest.approx(4 * 6)
        assert m["goodput"] == pytest.approx(m["request_throughput"])  # SLOs of a minute: all meet them
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            check_summary(m[key])
        assert m["ttft_ms"]["p50"] <= m["e2el_ms"]["p50"]
    assert "TTFT" in stdout


def test_serve_over_the_openai_http_api(tmp_path):
    """`serve --backend openai`: the same workload through /v1/completions (streamed); every
    request completes with its output length, counted by the server."""
    result, stdout = run_bench(tmp_path, "serve", "--backend", "openai", "--num-prompts", "4", "--input-len", "16",
                               "--output-len", "6", "--request-rate", "inf", "--max-model-len", "256")
    assert result["backend"] == "openai" and result["model_info"]["id"] == "qwen-tiny"
    m = result["runs"][0]["metrics"]
    assert (m["completed"], m["failed"]) == (4, 0), m["errors"]
    assert m["output_token_throughput"] * m["duration_s"] == pytest.approx(4 * 6)
    for key in ("ttft_ms", "e2el_ms"):
        check_summary(m[key])
    assert m["ttft_ms"]["p50"] <= m["e2el_ms"]["p50"] and "TTFT" in stdout


def test_prefill_tokens_per_second(tmp_path):
    result, _ = run_bench(tmp_path, "prefill", "--random-weights", "--preset", "tiny", "--batch-size", "2",
                          "--input-len", "40")
    assert result["prefill_tokens_per_s"] > 0 and result["seconds"] > 0
    assert result["engine_steps"] == 1  # 2 x 40 tokens fit one step's budget


def test_kernel_benchmark_smoke_writes_what_gpu_check_reads(tmp_path):
    """benchmarks/kernels.py --smoke (tiny shapes, Triton interpreter): every kernel of the issue's
    list is measured, and the JSON has the fields gpu_check.sh's table reads."""
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["copy_gb_per_s"] > 0
    rows = {r["kernel"]: r for r in result["results"]}
    assert set(rows) == {"paged_attention decode", "paged_attention prefill", "rms_norm", "add_rms_norm",
                         "apply_rotary (q, k)", "store_kv", "swiglu"}
    decode = [r for r in result["results"] if r["kernel"] == "paged_attention decode"]
    assert [r["target_share"] for r in decode] == [0.8, 0.6]  # batch 64 x 4096, batch 1 x 32768 on CUDA
    for r in result["results"]:
        assert r["time_us"] > 0
        if r["kernel"] == "paged_attention prefill":
            assert r["tflop_per_s"] > 0
        else:
            assert r["gb_per_s"] > 0 and r["share_of_copy"] == pytest.approx(
                r["gb_per_s"] / result["copy_gb_per_s"])
    for name in ("rms_norm", "add_rms_norm", "apply_rotary (q, k)"):
        assert rows[name]["target_share"] == 0.8


def test_host_overhead_benchmark(tmp_path):
    """benchmarks/host_overhead.py: decode steps with the model stubbed, one row per batch size."""
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--batch-size", "1", "3",
                           "--steps", "2", "--blocks", "2", "--sampler", "real", "--repetition-penalty", "1.1",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["batch_size"] for r in result["results"]] == [1, 3]
    for r in result["results"]:
        assert r["ms_per_step"] > 0 and r["us_per_request"] == pytest.approx(r["ms_per_step"] * 1e3 / r["batch_size"])


def test_structured_output_benchmark(tmp_path):
    """benchmarks/structured_output.py: mask fill and apply per step, one row per batch size."""
    out = tmp_path / "so.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "structured_output.py"), "--batch-size", "1", "5",
                           "--steps", "2", "--blocks", "1", "--num-schemas", "3", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["batch_size"] for r in result["results"]] == [1, 5] and len(result["output_lengths"]) == 3
    for r in result["results"]:
        assert r["fill_cpu_ms"] > 0 and r["apply_cpu_ms"] > 0
        assert r["fill_cpu_us_per_row"] == pytest.approx(r["fill_cpu_ms"] * 1e3 / r["batch_size"])


def test_sampling_speed_benchmark(tmp_path):
    """benchmarks/sampling_speed.py: each mode at each batch size, with its speed against greedy."""
    out = tmp_path / "sampling.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sampling_speed.py"), "--batch-size", "1", "3",
                           "--modes", "top_p", "top_p_seeded", "--output-len", "3", "--prompt-len", "4", "--repeat", "2",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch_size"], r["mode"]) for r in rows] == [
        (b, m) for b in (1, 3) for m in ("greedy", "top_p", "top_p_seeded")]
    for r in rows:
        assert r["steps"] == 2 and r["tokens_per_s"] > 0 and len(r["ms_per_step_runs"]) == 2
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["ms_per_step"])
        if r["mode"] == "greedy":
            assert r["speed_vs_greedy"] == 1.0
    assert "vs greedy" in proc.stdout


_SIMULATOR_FORMULA = """
def step_time_s(num_tokens: int, num_context_tokens: int) -> float:
    return max(14.2e9 / 2.55e12, num_tokens * 2 * 7.7e9 / 600e12) + num_context_tokens * 0.52e6 / 2.5e12
"""


@pytest.mark.parametrize("with_simulator", [False, True])
def test_step_time_benchmark(tmp_path, with_simulator):
    """benchmarks/step_time.py on the CPU (tiny model, eager): each shape timed, and the simulated
    device's formula beside it when benchmarks/simulated_device.py exists; without it the run
    still measures, then fails naming the missing module. The module is provided here from a
    second directory on the path (benchmarks/ is a namespace package), when this checkout has none."""
    has_own = (REPO / "benchmarks" / "simulated_device.py").exists()
    paths = [str(REPO)]
    if with_simulator and not has_own:
        (tmp_path / "sim" / "benchmarks").mkdir(parents=True)
        (tmp_path / "sim" / "benchmarks" / "simulated_device.py").write_text(_SIMULATOR_FORMULA)
        paths.append(str(tmp_path / "sim"))
    if not with_simulator and has_own:
        pytest.skip("this checkout has benchmarks/simulated_device.py")
    out = tmp_path / "step.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--device", "cpu",
                           "--preset", "tiny", "--layers", "2", "--quick", "--reps", "1", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [r["shape"] for r in rows] == ["decode B=1 ctx 16", "decode B=4 ctx 40", "prefill 1 x 24"]
    assert [(r["num_tokens"], r["num_context_tokens"]) for r in rows] == [(1, 16), (4, 160), (24, 24)]
    assert all(r["eager_ms"] > 0 and r["graph_ms"] is None for r in rows)  # no CUDA graphs on a CPU
    if with_simulator:
        assert proc.returncode == 0, proc.stderr[-3000:]
        for r in rows:
            expected = (max(14.2e9 / 2.55e12, r["num_tokens"] * 2 * 7.7e9 / 600e12)
                        + r["num_context_tokens"] * 0.52e6 / 2.5e12) * 1e3
            assert r["formula_ms"] == pytest.approx(expected)
            assert r["measured_over_formula"] == pytest.approx(r["eager_ms"] / expected)
    else:
        assert proc.returncode == 2
        assert "benchmarks/simulated_device.py is not in this checkout" in proc.stderr
        assert all(r["formula_ms"] is None for r in rows)


def test_gpu_check_fits_ten_minutes_and_runs_its_new_stages_on_a_cpu(tmp_path):
    """gpu_check.sh: the default stage limits add up to under 600 s (one 10-minute command), and its
    checkpoint, step-time and Int4 stages run end to end in its CPU trial mode."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    limits = {name: int(value) for name, value in re.findall(r'(T_[A-Z0-9]+)="\$\{T_[A-Z0-9]+:-(\d+)\}"', script)}
    assert set(limits) >= {"T_ENV", "T_CKPT", "T_TESTS", "T_KERNELS", "T_OFFLINE", "T_DECODE", "T_PREFILL",
                           "T_STEPTIME", "T_INT4"}
    assert sum(limits.values()) <= 595, limits
    env = dict(os.environ, STAGES="ckpt steptime int4", DEVICE="cpu", PRESET="tiny", DECODE_LAYERS="2")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "out" / "table.txt").read_text()
    sim = (REPO / "benchmarks" / "simulated_device.py").exists()
    for stage in ("steptime", "int4"):
        line = next(l for l in table.splitlines() if l.startswith(stage))
        assert ("ok" if sim else "fail(2)") in line, table
        assert "decode B=1 ctx 16" in line and " ms" in line, table  # the CPU trial's quick shapes
    assert (tmp_path / "out" / "qwen-tiny-2layers-int4" / "model.safetensors.index.json").exists()
