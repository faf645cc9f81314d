"""Per-step control overhead of tensor parallelism: tp = N on Ray against tp = 1 in-process, on
the built-in tiny model (float32, CPU unless --device cuda).

Two numbers per tp size:

    empty step   `executor.execute_model` of a SchedulerOutput with nothing scheduled: the
                 workers return at once, so this is the pure control cost of a step (send the
                 message to every rank over the step channel, wait for all, bring rank 0's
                 output back)
    decode step  `engine.step()` while B requests decode one token each: control + model +
                 all-reduces + sampling, the number a user sees

    all-reduce   one all-reduce of a [1, hidden] tensor inside the ranks (gloo or NCCL); a
                 decode step makes 2 per layer + 1 for the embedding, then gathers the logits

Every rank, and the tp = 1 engine, computes with `--threads` intra-op threads (default 1): the
ranks get OMP_NUM_THREADS = cores // tp, and on a small shared CPU more threads than cores make
OpenMP spin-waits dominate (2 threads on a busy 2-core box were 10x slower than 1).

The tiny model's compute is a few milliseconds, so the decode-step difference between tp = N and
tp = 1 is mostly overhead (control message, all-reduces, the logits gather); on a real model it
is amortised over a much longer forward.

    PYTHONPATH=. python benchmarks/tp_overhead.py [--tp 2] [--batch 1 8] [--steps 200] [--threads 1]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwenserve import LLM, SamplingParams  # noqa: E402
from qwenserve.scheduler.output import SchedulerOutput  # noqa: E402


def _median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _rank_all_reduce(rank_worker, hidden: int, iters: int) -> float:
    import torch.distributed as dist

    x = torch.zeros(1, hidden, device=rank_worker.worker.device, dtype=rank_worker.worker.dtype)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        dist.all_reduce(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _all_reduce_ms(executor, hidden: int, iters: int) -> float:
    import ray

    # __ray_call__ runs a function on the actor's own instance: a probe, not an executor API. It
    # goes to the "health" concurrency group: the default one is busy serving the step channel.
    refs = [a.__ray_call__.options(concurrency_group="health").remote(_rank_all_reduce, hidden, iters)
            for a in executor.actors]
    return max(ray.get(refs))


def measure(tp: int, batches: list[int], steps: int, device: str) -> dict:
    started = time.perf_counter()
    llm = LLM(tensor_parallel_size=tp, device=device, dtype="float32", kv_cache_memory=64 * 1024 ** 2)
    result = {"startup_s": time.perf_counter() - started}
    try:
        engine, executor = llm.engine, llm.engine.executor
        empty = SchedulerOutput()
        _median_ms(lambda: executor.execute_model(empty), 20)  # warm-up
        result["empty"] = _median_ms(lambda: executor.execute_model(empty), steps)
        for batch in batches:
            params = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
            ids = [engine.add_request(prompt_token_ids=[100 + i] * 16, params=params) for i in range(batch)]
            for _ in range(10):  # prefill and a few warm-up decode steps
                engine.step()
            result[f"decode_b{batch}"] = _median_ms(engine.step, steps)
            for rid in ids:
                engine.abort_request(rid)
        if tp > 1:
            result["all_reduce"] = _all_reduce_ms(executor, engine.model_config.hidden_size, steps)
    finally:
        llm.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2], help="tp sizes to compare with tp = 1")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decoding requests per step")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the tp = 1 engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = {tp: measure(tp, args.batch, args.steps, args.device) for tp in [1] + args.tp}
    cols = ["empty"] + [f"decode_b{b}" for b in args.batch]
    header = ["tp", "startup s", "empty step ms"] + [f"decode B={b} ms" for b in args.batch] + ["all-reduce ms"]
    print(f"tiny model, {args.device}, float32, median of {args.steps} steps, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for tp, r in rows.items():
        cells = [str(tp), f"{r['startup_s']:.1f}"] + [f"{r[c]:.2f}" for c in cols]
        cells.append(f"{r['all_reduce']:.3f}" if "all_reduce" in r else "-")
        print("| " + " | ".join(cells) + " |")
    for tp in args.tp:
        extra = [f"{rows[tp][c] - rows[1][c]:+.2f}" for c in cols]
        print("| " + " | ".join([f"{tp} minus 1", ""] + extra + [""]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
