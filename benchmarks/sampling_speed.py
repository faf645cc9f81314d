"""Decode throughput with sampling against greedy, on the built-in model (CPU).

The sampler runs on rank 0 after every forward, on [B, 151,936] float32 logits. This measures
what it costs end to end: `--batch-size` requests decode through `LLMEngine.step()` on the
built-in tiny model (its LM head is most of a step, as a 7B's weights are on a GPU), once per
sampling mode, and the decode steps after every request has its first token are timed (CPU time
of this process, one torch thread). Reported per mode and batch: tok/s and the ratio of greedy's
step time to the mode's (1.0 = as fast as greedy; the target is >= 1/1.5 at batch 200). With
`--repeat N` the modes of a batch size run N times in turn and each reports its median: other
processes' load comes and goes, and interleaving spreads it over the modes alike.

    python benchmarks/sampling_speed.py [--batch-size 1 64 200 256] [--modes greedy top_p ...]
        [--output-len 16] [--repeat 3] [--json PATH]

Modes: greedy; temperature (0.7); top_p (0.8, temperature 1, Qwen-Chat's default filter);
top_p_seeded (the same, each request seeded); top_k_top_p (top_k 50, top_p 0.8); min_p (0.1).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine import LLMEngine  # noqa: E402
from qwenserve.sampling_params import SamplingParams  # noqa: E402

MODES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.7),
    "top_p": dict(temperature=1.0, top_p=0.8),
    "top_p_seeded": dict(temperature=1.0, top_p=0.8),  # plus a seed per request
    "top_k_top_p": dict(temperature=1.0, top_k=50, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.1),
}


_RUNS = itertools.count()


def measure(engine: LLMEngine, batch_size: int, mode: str, args) -> dict:
    run = next(_RUNS)
    for i in range(batch_size):
        seed = {"seed": i} if mode.endswith("_seeded") else {}
        params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, **MODES[mode], **seed)
        prompt = [100 + (7 * i + j) % 5000 for j in range(args.prompt_len)]
        engine.add_request(f"{mode}-{batch_size}-{run}-{i}", prompt_token_ids=prompt, params=params)
    engine.step(finished_only=True)  # the prefill (the whole batch fits one step) and first tokens
    assert engine.scheduler.num_running == batch_size, "every request must be decoding"
    first_step, start = engine.scheduler.num_steps, time.process_time()
    while engine.has_unfinished_requests():
        engine.step(finished_only=True)
    seconds = time.process_time() - start
    # Steps that computed something (with overlapped steps the last call only collects samples).
    steps = engine.scheduler.num_steps - first_step
    ms_per_step = seconds / steps * 1e3
    return dict(batch_size=batch_size, mode=mode, steps=steps, ms_per_step=ms_per_step,
                tokens_per_s=batch_size * steps / seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 64, 200, 256])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode, interleaved; the median counts")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.batch_size) < 1 or args.prompt_len < 1 or args.output_len < 2 or args.repeat < 1:
        parser.error("--batch-size, --prompt-len and --repeat must be positive, --output-len at least 2")
    modes = ["greedy"] + [m for m in args.modes if m != "greedy"]  # the ratios need greedy
    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", use_triton=False,
                                    max_num_seqs=max(args.batch_size),
                                    max_num_batched_tokens=max(args.batch_size) * args.prompt_len,
                                    kv_cache_memory=1 << 30, enable_prefix_caching=False))
    print(f"{args.output_len} tokens per request, CPU time per decode step, one torch thread")
    print(f"{'batch':>6} {'mode':14}{'ms/step':>10}{'tok/s':>10}{'vs greedy':>11}", flush=True)
    rows = []
    for batch_size in args.batch_size:
        measure(engine, batch_size, "greedy", args)  # warm-up at this size (allocator, caches)
        runs = {mode: [] for mode in modes}
        for _ in range(args.repeat):
            for mode in modes:
                runs[mode].append(measure(engine, batch_size, mode, args))
        for mode in modes:
            r = sorted(runs[mode], key=lambda run: run["ms_per_step"])[(args.repeat - 1) // 2]
            r["ms_per_step_runs"] = [run["ms_per_step"] for run in runs[mode]]
            if mode == "greedy":
                greedy = r["ms_per_step"]
            r["speed_vs_greedy"] = greedy / r["ms_per_step"]
            rows.append(r)
            print(f"{r['batch_size']:>6} {r['mode']:14}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>10.0f}"
                  f"{r['speed_vs_greedy']:>10.2f}x", flush=True)
    engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), results=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
