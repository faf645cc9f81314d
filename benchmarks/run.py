"""qwenserve benchmarks: offline throughput against transformers, batch-1 decode against the
bandwidth floor, and online serving latency over gRPC.

    python benchmarks/run.py offline [--model DIR] [--tp N] --dataset mixed|random|FILE.jsonl
        [--num-prompts N] [--input-len L --output-len L] [--baseline-batch-size 32] [--no-baseline]
    python benchmarks/run.py decode  [--model DIR | --random-weights --preset 7b --layers 32]
        [--batch-size 1] [--input-len 128] [--output-len 256]
    python benchmarks/run.py prefill [--model DIR | --random-weights --preset 7b --layers 32]
        [--batch-size 8] [--input-len 2048]
    python benchmarks/run.py serve   [--address HOST:PORT | --base-url URL | --model DIR] [--request-rate 1 4 inf]
        [--backend grpc|openai] [--max-concurrency N] [--slo-ttft MS] [--slo-tpot MS] [--plot latency.png]

offline, decode and serve take `--simulate-device h100-7b`: the engine (the server's, for serve)
runs with its model's arithmetic replaced by benchmarks/simulated_device.py, so the host path is
measured against the time an H100 needs for each step of Qwen-7B; every such run reports device
busy % (modelled device seconds inside the measured window / the window's wall time) and runs
without the transformers baseline. The random dataset takes length ranges (`--input-len 128:512`).

Every mode takes `--json PATH` (all metrics plus date, device, commit and command line, the
fields docs/PERFORMANCE.md records). Workloads come from `benchmarks/datasets.py`.

offline: the workload runs through `LLM.generate` (greedy, ignore_eos), then the same token ids
through Hugging Face `generate` on the same weights (`load_qwen2_model`) in static batches of
`--baseline-batch-size` in arrival order, each left-padded and run to its longest output;
only each request's own output length counts as output ("useful output tok/s", as
docs/PERFORMANCE.md defines it).
Each system is warmed up once, on other token ids, before it is timed.
decode: per-step time of a batch after its prefill, against weight bytes / copy bandwidth.
serve: Poisson arrivals per `--request-rate`, streamed through `AsyncQwenClient` (gRPC), or with
`--backend openai` through the OpenAI-compatible HTTP API (`benchmarks/openai_backend.py`); with
`--max-concurrency N` at most N requests are in flight (with rate inf: a closed loop of N
streams, each sending its next request when its previous one ends).
The transformers baseline, `--backend openai` and `--plot` need packages qwenserve itself does
not: `pip install -e '.[bench]'`; without them the run says so and goes on without that part.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_BENCH_DIR)
# Run as a script, sys.path[0] is benchmarks/, where our datasets.py would shadow the
# `datasets` package that transformers probes for; import everything from the repo root.
if sys.path and os.path.abspath(sys.path[0] or ".") == _BENCH_DIR:
    sys.path[0] = _REPO
elif _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks.datasets import (BenchRequest, RequestSampling, build_workload, describe, fixed_workload,  # noqa: E402
                                 poisson_arrivals, serve_metrics, throughput)
from benchmarks.random_weights import random_weights_dir, use_random_weights  # noqa: E402
from benchmarks.simulated_device import (PLUGINS, STATS_ENV, busy_within,  # noqa: E402  (light: numpy)
                                         read_stats_file, stats_file_path)
from benchmarks.grammar_walk import BENCH_STRUCTURES  # noqa: E402  (light: numpy)
from qwenserve.arg_types import int_in, parse_bytes  # noqa: E402  (light: no torch, no grpc)

PAD_ID = 151643  # <|endoftext|>: the baseline's left padding (masked out)


# ---------------------------------------------------------------- shared helpers
def engine_kwargs(args) -> dict:
    """`LLM`/`EngineConfig` keywords from the engine flags that were given."""
    kw = {"tensor_parallel_size": args.tp, "device": args.device, "dtype": args.dtype, "seed": args.seed}
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks",
                 "kv_cache_memory", "gpu_memory_utilization"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.no_prefix_caching:
        kw["enable_prefix_caching"] = False
    if getattr(args, "simulate_device", None):
        kw["executor_plugin"] = PLUGINS[args.simulate_device]
    if getattr(args, "engine_core_process", False):
        kw["engine_core_process"] = True
    return kw


def length_range(text: str) -> tuple:
    """argparse type: "N" (a fixed length) or "LOW:HIGH" (uniform, inclusive), each >= 1."""
    parts = text.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        low, high = 0, -1
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def request_sampling(args) -> RequestSampling:
    """The run's `RequestSampling` from its flags (greedy where a mode has none)."""
    name = getattr(args, "structured_output", None)
    return RequestSampling(temperature=getattr(args, "temperature", 0.0), top_p=getattr(args, "top_p", 1.0),
                           schema=BENCH_STRUCTURES[name] if name else None)


def simulated_sampler_stats(executor, before: Optional[dict] = None) -> dict:
    """The simulated sampler's structured-output counters (since `before`): host seconds in
    fill_bitmask (real work) and in drawing allowed tokens (simulation overhead)."""
    sampler = getattr(getattr(getattr(executor, "worker", None), "runner", None), "sampler", None)
    if not hasattr(sampler, "picker"):
        return {}
    now = {"mask_fill_s": sampler.mask_seconds, "allowed_draw_s": sampler.picker.seconds,
           "structured_rows": sampler.num_structured_rows}
    return now if before is None else {k: v - before.get(k, 0) for k, v in now.items()}


def print_structured(m: dict, steps: Optional[int] = None) -> None:
    if not m.get("structured_rows"):
        return
    per_step = f" ({1e3 * m['mask_fill_s'] / steps:.2f} ms per decode step)" if steps else ""
    print(f"structured output: {m['structured_rows']} masked rows, mask fill {m['mask_fill_s']:.2f} s on the "
          f"host{per_step}, {1e6 * m['mask_fill_s'] / m['structured_rows']:.0f} us per row; drawing allowed "
          f"tokens {m['allowed_draw_s']:.2f} s (simulation overhead)")


def busy_pct(busy_s: float, window: tuple) -> float:
    return 100.0 * busy_s / (window[1] - window[0])


def environment(simulated: Optional[str] = None) -> dict:
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if simulated:
        device = f"simulated {simulated} (host: {device})"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device, "commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}


def load_workload(args, model_dir: str) -> list:
    encode = None
    if args.dataset not in ("mixed", "random", "multi-tenant"):
        from qwenserve.model.tokenizer import QwenTokenizer
        encode = QwenTokenizer.from_dir(model_dir).encode
    return build_workload(args.dataset, args.num_prompts, args.input_len, args.output_len, args.seed, encode,
                          num_system_prompts=args.num_system_prompts, system_len=args.system_len)


def warmup_requests(requests: list, seed: int, n: int = 4) -> list:
    """Short requests on token ids the workload never uses, so that no prefix is cached."""
    return fixed_workload(min(n, len(requests)), min(32, requests[0].prompt_len), 4, seed=seed + 10_000)


def resolve_model(args) -> str:
    from qwenserve.model.checkpoint import builtin_model_dir
    if getattr(args, "random_weights", False):
        if args.tp != 1:
            raise SystemExit("--random-weights works in-process only (--tp 1)")
        use_random_weights(args.seed)
        return random_weights_dir(args.preset, args.layers)
    return args.model or builtin_model_dir()


def free_device_memory() -> None:
    """Returns dropped engines' and models' memory, so the next system finds the device empty."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- offline
def sampling_params(sampling: RequestSampling, max_tokens: int):
    """The SamplingParams of one benchmark request."""
    from qwenserve import SamplingParams, StructuredOutput
    structure = StructuredOutput(json_schema=sampling.schema) if sampling.schema is not None else None
    return SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                          ignore_eos=True, structured_output=structure)


def run_qwenserve(llm, requests: list, sampling: RequestSampling = RequestSampling()) -> tuple:
    params = [sampling_params(sampling, r.output_len) for r in requests]
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=[r.prompt_token_ids for r in requests], sampling_params=params,
                        use_tqdm=sys.stderr.isatty())
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def run_transformers(model, requests: list, batch_size: int, device) -> tuple:
    """Static batches in arrival order; returns (elapsed, useful output tokens, generated tokens)."""
    import torch
    start = time.perf_counter()
    useful = generated = 0
    with torch.inference_mode():
        for i in range(0, len(requests), batch_size):
            batch = requests[i:i + batch_size]
            width = max(r.prompt_len for r in batch)
            ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, r in enumerate(batch):  # left padding: every prompt ends at the last column
                ids[row, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
                mask[row, width - r.prompt_len:] = 1
            new = max(r.output_len for r in batch)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                                 do_sample=False, pad_token_id=PAD_ID)
            produced = out.shape[1] - width
            generated += produced * len(batch)
            useful += sum(min(r.output_len, produced) for r in batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, useful, generated


NO_TRANSFORMERS = ("note: no transformers baseline: the transformers package is not installed "
                   "(pip install -e '.[bench]'; --no-baseline silences this)")


def cmd_offline(args) -> dict:
    import torch

    from qwenserve import LLM
    from qwenserve.worker.worker import resolve_device, resolve_dtype
    model_dir = resolve_model(args)
    requests = load_workload(args, model_dir)
    workload = dict(describe(requests), dataset=args.dataset, seed=args.seed)
    if not (args.no_baseline or getattr(args, "random_weights", False)) \
            and importlib.util.find_spec("transformers") is None:
        print(NO_TRANSFORMERS)  # said before the run, not after it: the baseline is an extra
        args.no_baseline = True
    print(f"workload: {args.dataset}, {workload['num_requests']} requests, "
          f"{workload['total_input_tokens']} input + {workload['total_output_tokens']} output tokens")
    result = {"mode": "offline", "environment": environment(args.simulate_device), "workload": workload,
              "model": model_dir, "engine": engine_kwargs(args)}

    stats_dir = None
    if args.simulate_device and args.engine_core_process:  # the core process writes its busy time here
        stats_dir = tempfile.TemporaryDirectory(prefix="qwenserve-sim-")
        os.environ[STATS_ENV] = os.path.join(stats_dir.name, "device.stats")
    llm = LLM(model=model_dir, **engine_kwargs(args))
    if args.engine_core_process:
        ready = llm.engine.core.ready_message()
        executor, device, dtype = None, ready.device, ready.dtype
    else:
        executor = llm.engine.executor
        device = getattr(executor, "device", None) or resolve_device(llm.engine.config)
        dtype = getattr(executor, "dtype", None) or resolve_dtype(llm.engine.config, llm.engine.model_config, device)
    result["device"], result["dtype"] = str(device), str(dtype).replace("torch.", "")
    sampling = request_sampling(args)
    run_qwenserve(llm, warmup_requests(requests, args.seed), sampling)
    sampler_before = simulated_sampler_stats(executor)
    window_start = time.monotonic()
    elapsed, out_tokens = run_qwenserve(llm, requests, sampling)
    window = (window_start, time.monotonic())
    ours = result["qwenserve"] = throughput(requests, elapsed, out_tokens)
    if args.simulate_device:
        if executor is None:
            busy_s = busy_within(*read_stats_file(os.environ[STATS_ENV], covering=window[1]), *window)
        else:
            busy_s = executor.stream.busy_between(*window)
        ours["device_busy_pct"] = busy_pct(busy_s, window)
        ours.update(simulated_sampler_stats(executor, sampler_before))
    ours["num_preemptions"] = llm.get_stats().get("num_preemptions")
    if out_tokens != workload["total_output_tokens"]:
        print(f"warning: qwenserve produced {out_tokens} output tokens, the workload asks for "
              f"{workload['total_output_tokens']}")
    llm.shutdown()
    del llm, executor
    if stats_dir is not None:
        os.environ.pop(STATS_ENV, None)
        stats_dir.cleanup()
    free_device_memory()

    result["baseline"] = result["speedup"] = None
    if args.no_baseline or getattr(args, "random_weights", False) or args.simulate_device:
        if args.simulate_device:
            print("note: no transformers baseline with --simulate-device")
        elif not args.no_baseline:
            print("note: no transformers baseline with --random-weights (it needs a checkpoint)")
    else:
        result["baseline"], result["speedup"] = run_baseline(args, model_dir, requests, dtype, device, ours)
    print_offline(result)
    return result


def run_baseline(args, model_dir: str, requests: list, dtype, device, ours: dict) -> tuple:
    """(the transformers baseline's metrics, qwenserve's speedup over it); (None, None) when
    transformers cannot be imported, ({"error": ...}, None) when it runs out of memory."""
    import torch
    try:
        from qwenserve.model.hf_reference import load_qwen2_model
        model = load_qwen2_model(model_dir, dtype=dtype, device=str(device))
    except ImportError as e:  # installed but broken: a note, not a traceback after the whole run
        print(f"{NO_TRANSFORMERS} ({e})")
        return None, None
    try:
        run_transformers(model, warmup_requests(requests, args.seed), args.baseline_batch_size, device)
        elapsed, useful, generated = run_transformers(model, requests, args.baseline_batch_size, device)
    except torch.OutOfMemoryError as e:  # e.g. too large a batch: keep qwenserve's numbers
        return {"error": f"out of memory: {e}".splitlines()[0]}, None
    finally:
        del model
        free_device_memory()
    base = throughput(requests, elapsed, useful)
    base.update(batch_size=args.baseline_batch_size, generated_tokens_incl_padding_steps=generated,
                name=f"transformers generate, static batches of {args.baseline_batch_size}")
    return base, base["elapsed_s"] / ours["elapsed_s"]


def print_offline(result: dict) -> None:
    rows = [("qwenserve", result["qwenserve"])]
    if result["baseline"]:
        rows.append(("transformers", result["baseline"]))
    print(f"{'':14}{'req/s':>10}{'total tok/s':>14}{'output tok/s':>14}{'time (s)':>10}")
    for name, m in rows:
        if "error" in m:
            print(f"{name:14}{m['error']}")
            continue
        print(f"{name:14}{m['requests_per_s']:>10.2f}{m['total_tokens_per_s']:>14.1f}"
              f"{m['output_tokens_per_s']:>14.1f}{m['elapsed_s']:>10.2f}")
    if "device_busy_pct" in result["qwenserve"]:
        print(f"device busy: {result['qwenserve']['device_busy_pct']:.1f}% ({result['device']})")
        print_structured(result["qwenserve"])
    if result["speedup"]:
        print(f"qwenserve / transformers: {result['speedup']:.2f}x "
              f"(device {result['device']}, {result['dtype']}, baseline batch {result['baseline']['batch_size']})")


# ---------------------------------------------------------------- decode
def copy_bandwidth(device, nbytes: int, iters: int = 10) -> float:
    """Bytes read + written per second by `dst.copy_(src)`, median of `iters` copies."""
    import torch
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(iters + 1):  # the first copy is a warm-up
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / sorted(times[1:])[iters // 2]


def timed_decode(engine, requests: list, sampling: RequestSampling = RequestSampling()) -> dict:
    """Steps the engine until done; times the steps after every request has its first token."""
    counts = {}
    for k, r in enumerate(requests):
        params = sampling_params(sampling, r.output_len)
        rid = engine.add_request(f"decode-{time.monotonic_ns()}-{k}", prompt_token_ids=r.prompt_token_ids,
                                 params=params)
        counts[rid] = 0
    start, first_all, steps = time.monotonic(), None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
        if first_all is not None:
            steps += 1
        elif all(counts.values()):
            first_all = time.monotonic()
    end = time.monotonic()
    step_s = (end - first_all) / max(steps, 1)
    return {"prefill_s": first_all - start, "decode_steps": steps, "ms_per_step": 1e3 * step_s,
            "tokens_per_s_per_seq": 1.0 / step_s, "output_tokens_per_s": len(requests) / step_s,
            "decode_window": (first_all, end)}


def cmd_decode(args) -> dict:
    from qwenserve import LLM, EngineConfig
    from qwenserve.worker.worker import resolve_device
    if args.tp != 1:  # the floor below reads the weights of the in-process worker
        raise SystemExit("decode measures one device: use --tp 1")
    if args.simulate_device:
        return cmd_decode_simulated(args)
    model_dir = resolve_model(args)
    device = resolve_device(EngineConfig(device=args.device))
    if args.copy_bandwidth is not None:
        bandwidth = args.copy_bandwidth * 1e9
    else:  # measured before the model and KV cache take the memory
        size = args.copy_bytes or ("2GiB" if device.type == "cuda" else "256MiB")
        bandwidth = copy_bandwidth(device, parse_bytes(size))
    llm = LLM(model=model_dir, **engine_kwargs(args))
    model = llm.engine.executor.worker.model
    # A decode step reads every weight once except the embedding table (one row per token).
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("wte"))
    requests = fixed_workload(args.batch_size, args.input_len, args.output_len, args.seed)
    sampling = request_sampling(args)
    timed_decode(llm.engine, fixed_workload(args.batch_size, min(16, args.input_len), 8, args.seed + 10_000), sampling)
    measured = timed_decode(llm.engine, requests, sampling)
    del measured["decode_window"]
    floor = bandwidth / weight_bytes
    result = {"mode": "decode", "environment": environment(), "model": model_dir, "engine": engine_kwargs(args),
              "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
              "device": str(device), "dtype": str(llm.engine.executor.dtype).replace("torch.", ""),
              "weight_bytes_per_step": weight_bytes, "copy_bandwidth_GBps": bandwidth / 1e9,
              "floor_tokens_per_s_per_seq": floor, **measured,
              "fraction_of_floor": measured["tokens_per_s_per_seq"] / floor}
    llm.shutdown()
    print(f"decode, batch {args.batch_size}, {args.input_len} in / {args.output_len} out on {device} "
          f"({result['dtype']}): {measured['ms_per_step']:.2f} ms/step, "
          f"{measured['tokens_per_s_per_seq']:.1f} tok/s per sequence")
    print(f"floor: {weight_bytes / 1e9:.2f} GB of weights / {bandwidth / 1e9:.1f} GB/s copy = "
          f"{1e3 / floor:.2f} ms -> {floor:.1f} tok/s; measured = {100 * result['fraction_of_floor']:.0f}% of it")
    return result


def cmd_decode_simulated(args) -> dict:
    """Decode on the simulated device: per-step wall time against the modelled step time."""
    from qwenserve import LLM
    if args.random_weights:
        raise SystemExit("--simulate-device replaces the model: drop --random-weights")
    model_dir = resolve_model(args)
    llm = LLM(model=model_dir, **engine_kwargs(args))
    executor, sampling = llm.engine.executor, request_sampling(args)
    stream = executor.stream
    timed_decode(llm.engine, fixed_workload(args.batch_size, min(16, args.input_len), 8, args.seed + 10_000), sampling)
    sampler_before = simulated_sampler_stats(executor)
    measured = timed_decode(llm.engine, fixed_workload(args.batch_size, args.input_len, args.output_len, args.seed),
                            sampling)
    measured.update(simulated_sampler_stats(executor, sampler_before))
    window = measured.pop("decode_window")
    busy_s = stream.busy_between(*window)
    result = {"mode": "decode", "environment": environment(args.simulate_device), "model": model_dir,
              "engine": engine_kwargs(args), "batch_size": args.batch_size, "input_len": args.input_len,
              "output_len": args.output_len, "device": llm.engine.executor.device, "dtype": "bfloat16",
              **measured, "modelled_ms_per_step": 1e3 * busy_s / max(measured["decode_steps"], 1),
              "device_busy_pct": busy_pct(busy_s, window)}
    llm.shutdown()
    print(f"decode, batch {args.batch_size}, {args.input_len} in / {args.output_len} out on {result['device']}: "
          f"{measured['ms_per_step']:.2f} ms/step (modelled {result['modelled_ms_per_step']:.2f}), "
          f"{measured['tokens_per_s_per_seq']:.1f} tok/s per sequence")
    print(f"device busy: {result['device_busy_pct']:.1f}%")
    print_structured(result, result["decode_steps"])
    return result


# ---------------------------------------------------------------- prefill
def cmd_prefill(args) -> dict:
    """Prompt tokens/s of whole prompts (docs/PERFORMANCE.md's prefill target: 8 x 2048 at 40k
    tok/s or more), each request's first token only."""
    from qwenserve import LLM
    model_dir = resolve_model(args)
    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_num_batched_tokens", args.batch_size * args.input_len)
    llm = LLM(model=model_dir, **kwargs)
    sync = _device_sync(llm.engine.executor.device)

    def run(seed):
        from qwenserve import SamplingParams
        for k, r in enumerate(fixed_workload(args.batch_size, args.input_len, 1, seed)):
            llm.engine.add_request(f"prefill-{seed}-{k}", prompt_token_ids=r.prompt_token_ids,
                                   params=SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        sync()
        start, first_step = time.perf_counter(), llm.engine.scheduler.num_steps
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        sync()
        return time.perf_counter() - start, llm.engine.scheduler.num_steps - first_step

    run(args.seed + 10_000)  # warm-up on other ids: nothing for the prefix cache to hit
    elapsed, steps = run(args.seed)
    tokens = args.batch_size * args.input_len
    result = {"mode": "prefill", "environment": environment(), "model": model_dir, "engine": kwargs,
              "batch_size": args.batch_size, "input_len": args.input_len, "seconds": elapsed,
              "engine_steps": steps, "prefill_tokens_per_s": tokens / elapsed,
              "dtype": str(llm.engine.executor.dtype).replace("torch.", "")}
    llm.shutdown()
    print(f"prefill, {args.batch_size} x {args.input_len} tokens in {steps} step(s) ({result['dtype']}): "
          f"{elapsed * 1e3:.1f} ms, {result['prefill_tokens_per_s']:,.0f} tok/s")
    return result


def _device_sync(device):
    import torch
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------- serve
class ServerProcess:
    """`qwenserve launch --port 0 --http-port 0` as a subprocess; `address` (gRPC) and `http_url`
    come from its "ready on HOST:PORT (gRPC) and http://HOST:PORT (HTTP)" line."""

    def __init__(self, flags: list, timeout: float, extra_env: Optional[dict] = None):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p),
                   **(extra_env or {}))
        cmd = [sys.executable, "-u", "-m", "qwenserve.cli", "launch", "--host", "127.0.0.1", "--port", "0",
               "--http-port", "0", *flags]
        print("starting:", " ".join(shlex.quote(c) for c in cmd))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=_REPO, env=env)
        self.lines, self.address = [], None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()  # also keeps the pipe drained
        if not self._ready.wait(timeout) or self.address is None:
            self.stop()
            raise SystemExit("server did not become ready:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "ready" in line and " on " in line and self.address is None:
                self.address = line.split(" on ", 1)[1].split()[0]
                self.http_url = next((w for w in line.split() if w.startswith(("http://", "https://"))), None)
                self._ready.set()
        self._ready.set()  # exited before ready

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(client, req: BenchRequest, send_at: float, t0: float,
                      slots: Optional[asyncio.Semaphore], sampling: RequestSampling = RequestSampling()) -> dict:
    await asyncio.sleep(max(0.0, t0 + send_at - time.perf_counter()))
    if slots is None:
        return await _stream_request(client, req, sampling)
    async with slots:  # --max-concurrency: the request is sent (and timed) once a slot frees
        return await _stream_request(client, req, sampling)


async def _stream_request(client, req: BenchRequest, sampling: RequestSampling = RequestSampling()) -> dict:
    import grpc
    start = time.perf_counter()
    token_times, tokens, error = [], 0, None
    try:
        async for delta in client.generate_stream(
                prompt_token_ids=req.prompt_token_ids, max_tokens=req.output_len, temperature=sampling.temperature,
                top_p=sampling.top_p, repetition_penalty=1.0, ignore_eos=True, json_schema=sampling.schema):
            if delta.token_ids:
                token_times.append(time.perf_counter())
                tokens += len(delta.token_ids)
    except grpc.RpcError as e:
        error = f"{e.code().name}: {e.details()}"
    end = time.perf_counter()
    if error is None and not token_times:
        error = "no tokens streamed"
    return {"start": start, "end": end, "token_times": token_times, "output_tokens": tokens,
            "input_tokens": req.prompt_len, "error": error}


async def run_rate(address: str, requests: list, rate: float, seed: int,
                   max_concurrency: Optional[int] = None, sampling: RequestSampling = RequestSampling()) -> tuple:
    """(per-request records, duration, the run's (start, end) on time.monotonic)."""
    from qwenserve.server.client import AsyncQwenClient
    async with AsyncQwenClient(address) as client:
        arrivals = poisson_arrivals(len(requests), rate, seed)
        slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        window_start, t0 = time.monotonic(), time.perf_counter()
        results = await asyncio.gather(*(one_request(client, r, a, t0, slots, sampling)
                                         for r, a in zip(requests, arrivals)))
        duration, window_end = time.perf_counter() - t0, time.monotonic()
    return results, duration, (window_start, window_end)


def print_serve(rate: float, m: dict) -> None:
    print(f"rate {rate:g} req/s: {m['completed']} done, {m['failed']} failed in {m['duration_s']:.2f} s; "
          f"{m['request_throughput']:.2f} req/s, {m['output_token_throughput']:.1f} output tok/s"
          + (f", goodput {m['goodput']:.2f} req/s" if m["goodput"] is not None else ""))
    if "device_busy_pct" in m:
        per_core = m.get("device_busy_pct_per_core")
        print(f"  device busy: {m['device_busy_pct']:.1f}%"
              + (" (per engine core: " + ", ".join(f"{b:.1f}%" for b in per_core) + ")" if per_core else ""))
    if m.get("prefix_cache_hit_rate") is not None:
        print(f"  prefix cache: {100 * m['prefix_cache_hit_rate']:.1f}% of {m['prefix_cache_query_tokens']} prompt "
              f"tokens hit; requests per engine core: {m['requests_per_engine_core']}")
    if m.get("engine_steps") is not None:
        print(f"  engine: {m['engine_steps']} steps, {m['preemptions']} preemptions")
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E")):
        s = m[key]
        if s["mean"] is not None:
            print(f"  {label:5} ms  mean {s['mean']:9.1f}  p50 {s['p50']:9.1f}  p90 {s['p90']:9.1f}  p99 {s['p99']:9.1f}")
    for e in m["errors"]:
        print(f"  error: {e}")


def plot_latency(runs: list, path: str) -> None:
    import matplotlib  # not a dependency of qwenserve: imported only for --plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    finite = [r["request_rate"] for r in runs if not math.isinf(r["request_rate"])]
    # inf ("all at once") is drawn one step beyond the largest finite rate.
    x_inf = 2 * max(finite) if finite else 1.0
    xs = [x_inf if math.isinf(r["request_rate"]) else r["request_rate"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "end-to-end latency")):
        for stat in ("mean", "p50", "p99"):
            ax.plot(xs, [r["metrics"][key][stat] for r in runs], marker="o", label=stat)
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s; rightmost = all at once)" if len(finite) < len(runs) else "request rate (req/s)")
        ax.set_ylabel("ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def server_flags(args) -> list:
    flags = ["--tp", str(args.tp), "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    if args.model:
        flags += ["--model", args.model]
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_memory",
                 "gpu_memory_utilization", "num_kv_blocks"):
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.no_prefix_caching:
        flags.append("--no-prefix-caching")
    return flags + shlex.split(args.server_args or "")


def engine_counters(grpc_address: Optional[str]) -> Optional[dict]:
    """The server's cumulative prefix-cache token counts and per-core routing (GetStats); None
    without a gRPC address (a --base-url run)."""
    if grpc_address is None:
        return None
    from qwenserve.server.client import QwenClient
    with QwenClient(grpc_address) as client:
        stats = client.stats(timeout=30)
    return {"query_tokens": stats["prefix_cache_query_tokens"], "hit_tokens": stats["prefix_cache_hit_tokens"],
            "routed": [r["num_routed_requests"] for r in stats["replicas"]],
            "steps": stats.get("num_steps", 0), "preemptions": stats.get("num_preemptions", 0)}


def prefix_cache_metrics(before: Optional[dict], after: Optional[dict]) -> dict:
    """Prefix-cache hit rate over a run (prompt tokens served from the cache / looked up), the
    requests each engine core got, and the engine steps and preemptions the run took."""
    if before is None or after is None:
        return {}
    queries = after["query_tokens"] - before["query_tokens"]
    hits = after["hit_tokens"] - before["hit_tokens"]
    return {"prefix_cache_hit_rate": hits / queries if queries else None, "prefix_cache_query_tokens": queries,
            "prefix_cache_hit_tokens": hits,
            "requests_per_engine_core": [a - b for a, b in zip(after["routed"], before["routed"])],
            # How the engine batched the run: fewer, fuller steps cost the device less time.
            "engine_steps": after["steps"] - before["steps"],
            "preemptions": after["preemptions"] - before["preemptions"]}


def device_busy(stats_path: str, num_devices: int, window: tuple) -> dict:
    """Busy % of the simulated device(s) inside the window: one per engine core, and their mean."""
    per_device = []
    for rank in range(num_devices):
        path = stats_file_path(stats_path, rank if num_devices > 1 else None)
        starts, ends = read_stats_file(path, covering=window[1])
        per_device.append(busy_pct(busy_within(starts, ends, *window), window))
    out = {"device_busy_pct": sum(per_device) / len(per_device)}
    if num_devices > 1:
        out["device_busy_pct_per_core"] = per_device
    return out


def cmd_serve(args) -> dict:
    from qwenserve.server.client import QwenClient
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # said before the run, not after it
        print("--plot needs matplotlib, which qwenserve does not depend on (pip install matplotlib); "
              "running without the plot")
        args.plot = None
    openai = args.backend == "openai"
    if (args.base_url and not openai) or (args.address and openai):
        raise SystemExit("serve: --address is a gRPC address (--backend grpc), --base-url an HTTP URL (--backend openai)")
    flags, extra_env, stats_dir = server_flags(args), {}, None
    if args.simulate_device:
        if args.address or args.base_url:
            raise SystemExit("--simulate-device starts its own server: drop --address/--base-url")
        stats_dir = tempfile.TemporaryDirectory(prefix="qwenserve-sim-")
        extra_env[STATS_ENV] = os.path.join(stats_dir.name, "device.stats")
        flags += ["--executor-plugin", PLUGINS[args.simulate_device]]
    server = None if args.address or args.base_url else ServerProcess(flags, args.server_timeout, extra_env)
    address = args.address or args.base_url or (server.http_url if openai else server.address)
    grpc_address = args.address or (server.address if server else None)
    try:
        num_cores = 1
        if grpc_address:
            with QwenClient(grpc_address) as client:
                num_cores = client.model_info(timeout=30).get("data_parallel_size") or 1
        if openai:
            from benchmarks import openai_backend
            info = openai_backend.model_info(address)
            runner = functools.partial(openai_backend.run_rate, model=info["id"], sampling=request_sampling(args))
        else:
            with QwenClient(address) as client:
                info = client.model_info(timeout=30)
            runner = functools.partial(run_rate, sampling=request_sampling(args))
        # Without --model a JSONL is tokenized with the vendored qwen.tiktoken (all Qwen-1 models share it).
        requests = load_workload(args, args.model)
        workload = dict(describe(requests), dataset=args.dataset, seed=args.seed)
        print(f"server {address} ({info.get('model') or info.get('id')}, {args.backend}); "
              f"workload: {args.dataset}, {len(requests)} requests")
        asyncio.run(runner(address, warmup_requests(requests, args.seed, 1), math.inf, args.seed))
        runs = []
        for rate in args.request_rate:
            before = engine_counters(grpc_address)
            results, duration, window = asyncio.run(
                runner(address, requests, rate, args.seed, args.max_concurrency))
            metrics = serve_metrics(results, duration, args.slo_ttft, args.slo_tpot)
            metrics.update(prefix_cache_metrics(before, engine_counters(grpc_address)))
            if args.simulate_device:
                metrics.update(device_busy(extra_env[STATS_ENV], num_cores, window))
            print_serve(rate, metrics)
            runs.append({"request_rate": rate, "metrics": metrics})
    finally:
        if server:
            server.stop()
        if stats_dir:
            stats_dir.cleanup()
    if args.plot:
        if len(runs) > 1:
            plot_latency(runs, args.plot)
        else:
            print("--plot draws latency against request rate: give several --request-rate values")
    return {"mode": "serve", "environment": environment(args.simulate_device), "address": address,
            "backend": args.backend, "model_info": info, "workload": workload,
            "max_concurrency": args.max_concurrency, "slo_ttft_ms": args.slo_ttft, "slo_tpot_ms": args.slo_tpot,
            "runs": [dict(r, request_rate=str(r["request_rate"]) if math.isinf(r["request_rate"])
                          else r["request_rate"]) for r in runs]}


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="checkpoint directory (default: the built-in tiny model)")
    common.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    common.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    common.add_argument("--seed", type=int, default=0, help="workload and engine seed")
    common.add_argument("--max-num-seqs", type=int, default=None)
    common.add_argument("--max-num-batched-tokens", type=int, default=None)
    common.add_argument("--max-model-len", type=int, default=None)
    common.add_argument("--kv-cache-memory", type=parse_bytes, default=None, help="CPU KV budget, e.g. 1GiB")
    common.add_argument("--gpu-memory-utilization", type=float, default=None)
    common.add_argument("--num-kv-blocks", type=int, default=None, help="fixed KV block count (per engine core)")
    common.add_argument("--no-prefix-caching", action="store_true")
    common.add_argument("--json", default=None, help="write every metric to this file")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--dataset", default="random",
                      help="random (fixed lengths), mixed (the standard workload), multi-tenant (shared "
                           "system prompts, each request its own suffix of --input-len) or a .jsonl of "
                           "{\"prompt\", \"output_len\"} (default: %(default)s)")
    data.add_argument("--num-system-prompts", type=int_in(1), default=16,
                      help="multi-tenant: how many system prompts the requests share (default: %(default)s)")
    data.add_argument("--system-len", type=length_range, default=(1024, 2048),
                      help="multi-tenant: system prompt tokens, N or LOW:HIGH (default: 1024:2048)")
    data.add_argument("--num-prompts", type=int, default=None, help="default: 512 mixed, 64 random, all of a file")
    data.add_argument("--input-len", type=length_range, default=(128, 128),
                      help="prompt tokens, N or LOW:HIGH (uniform; random dataset)")
    data.add_argument("--output-len", type=length_range, default=(128, 128),
                      help="output tokens, N or LOW:HIGH (uniform; random dataset)")
    sim = argparse.ArgumentParser(add_help=False)
    sim.add_argument("--structured-output", choices=sorted(BENCH_STRUCTURES), default=None,
                     help="every request asks for this JSON schema (benchmarks/grammar_walk.py: one that no "
                          "output completes, so lengths stay as asked); with --simulate-device the simulated "
                          "sampler computes the real masks and draws allowed tokens")
    sim.add_argument("--temperature", type=float, default=0.0,
                     help="every request's temperature (default 0: greedy); > 0 runs the sampled path")
    sim.add_argument("--top-p", type=float, default=1.0, help="every request's top_p")
    sim.add_argument("--simulate-device", choices=sorted(PLUGINS), default=None,
                     help="replace the model's arithmetic by a simulated GPU and report device busy %%")
    weights = argparse.ArgumentParser(add_help=False)
    weights.add_argument("--random-weights", action="store_true",
                         help="no checkpoint: random weights made on the device (shapes: --preset/--layers)")
    weights.add_argument("--preset", default="7b", help="shape preset for --random-weights")
    weights.add_argument("--layers", type=int, default=None, help="depth for --random-weights")

    p = sub.add_parser("offline", parents=[common, data, weights, sim], help="throughput vs transformers")
    p.add_argument("--baseline-batch-size", type=int, default=32)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--engine-core-process", action="store_true",
                   help="run LLM's engine core in a process of its own (default: in this one)")
    p.set_defaults(func=cmd_offline)

    p = sub.add_parser("decode", parents=[common, weights, sim], help="decode tok/s vs the bandwidth floor")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--copy-bytes", default=None, help="size of the measuring copy (default 2GiB on CUDA, 256MiB on CPU)")
    p.add_argument("--copy-bandwidth", type=float, default=None, help="GB/s (read + write); skips measuring")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("prefill", parents=[common, weights], help="prompt tok/s of whole prompts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=2048)
    p.set_defaults(func=cmd_prefill)

    p = sub.add_parser("serve", parents=[common, data, sim], help="online latency over gRPC or HTTP")
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="grpc: qwenserve.v1.Generation; openai: the OpenAI-compatible /v1/completions "
                        "(needs httpx: pip install -e '.[bench]') (default: %(default)s)")
    p.add_argument("--address", default=None, help="a running server's gRPC HOST:PORT; default: start one")
    p.add_argument("--base-url", default=None, help="a running server's HTTP URL (--backend openai), "
                                                    "e.g. http://127.0.0.1:8000")
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="requests/s, Poisson arrivals; several allowed; inf = all at once")
    p.add_argument("--max-concurrency", type=int_in(1), default=None,
                   help="at most N requests in flight (rate inf: N closed-loop streams)")
    p.add_argument("--slo-ttft", type=float, default=None, help="goodput: TTFT limit in ms")
    p.add_argument("--slo-tpot", type=float, default=None, help="goodput: TPOT limit in ms")
    p.add_argument("--plot", default=None, help="PNG of latency against request rate (needs matplotlib)")
    p.add_argument("--server-args", default=None, help="extra `qwenserve launch` flags, quoted")
    p.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for the server")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
