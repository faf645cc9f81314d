"""The real time of one engine step on a 7B-shaped model, next to the simulated device's formula.

The engine-core simulator (`benchmarks/simulated_device.py`, `step_time_s(num_tokens,
num_context_tokens)`) prices a step as max(weight read, FLOPs) + KV read, from H100 constants.
This measures what a real GPU takes for the same steps, so that the first lent GPU checks those
constants: a 32-layer 7B with random weights made on the device (nothing on disk), its KV cache,
and for each step shape the forward plus the LM head of every request's last token (what a
decode step computes; sampling excluded), timed with CUDA events, median of `--reps`. Decode
shapes are also timed through the captured CUDA graphs (the engine's decode path) next to eager.
`--int4` makes the same model in the GPTQ Int4 layout (fp16), random packed weights.

    python benchmarks/step_time.py [--layers 32] [--int4] [--reps 10] [--json PATH]
    python benchmarks/step_time.py --device cpu --preset tiny --layers 2 --quick   (plumbing only)

Per shape: T = tokens computed, C = sum of the sequence lengths (K/V read by attention, new tokens
included), measured ms eager and with graphs, the formula's ms, and measured / formula. Exits 2,
after measuring, when benchmarks/simulated_device.py is not in this checkout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from benchmarks.random_weights import random_weights_dir, use_random_weights  # noqa: E402
from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.model.attention import AttentionMetadata  # noqa: E402

# (name, requests, query tokens each, sequence length each): decode rows have query 1.
SHAPES = [
    ("decode B=1 ctx 128", 1, 1, 128),
    ("decode B=1 ctx 2048", 1, 1, 2048),
    ("decode B=32 ctx 512", 32, 1, 512),
    ("decode B=128 ctx 512", 128, 1, 512),
    ("decode B=256 ctx 256", 256, 1, 256),
    ("prefill 1 x 512", 1, 512, 512),
    ("prefill 1 x 2048", 1, 2048, 2048),
    ("prefill 4 x 2048", 4, 2048, 2048),
]
QUICK_SHAPES = [("decode B=1 ctx 16", 1, 1, 16), ("decode B=4 ctx 40", 4, 1, 40), ("prefill 1 x 24", 1, 24, 24)]
SIMULATOR_MISSING = ("benchmarks/simulated_device.py is not in this checkout (the simulated device, "
                     "whose step_time_s formula this compares with)")


def load_simulator():
    try:
        from benchmarks.simulated_device import step_time_s
    except ImportError:
        return None
    return step_time_s


def build_worker(args):
    from qwenserve.worker.worker import Worker

    use_random_weights(args.seed)
    model_dir = random_weights_dir(args.preset, args.layers, int4=args.int4)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    block_size = 16
    blocks = 1 + sum(n * math.ceil(seq / block_size) for _, n, _, seq in shapes)
    config = EngineConfig(model=model_dir, device=args.device, dtype=args.dtype, num_kv_blocks=blocks,
                          max_num_seqs=max(n for _, n, _, _ in shapes), block_size=block_size,
                          max_num_batched_tokens=max(n * q for _, n, q, _ in shapes), seed=args.seed)
    worker = Worker(config, model_dir)
    worker.load_model()
    worker.init_kv_cache(blocks)  # on CUDA this captures the decode graphs, as the engine does
    return worker, shapes


def step_inputs(worker, num_seqs: int, q_len: int, seq_len: int):
    """A step of `num_seqs` requests, each with `q_len` new tokens ending a `seq_len`-token
    sequence, on distinct KV blocks."""
    device, bs = worker.device, worker.config.block_size
    width = math.ceil(seq_len / bs)
    tables = (1 + torch.arange(num_seqs * width, dtype=torch.int32)).view(num_seqs, width)
    positions = torch.arange(seq_len - q_len, seq_len).repeat(num_seqs)
    rows = torch.arange(num_seqs).repeat_interleave(q_len)
    slots = tables[rows, positions // bs].long() * bs + positions % bs
    starts = [i * q_len for i in range(num_seqs + 1)]
    mc = worker.model_config
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device),
        max_query_len=q_len, max_seq_len=seq_len,
        rope_theta=torch.full((num_seqs * q_len,), mc.rope_theta(1.0), device=device),
        logn_scale=(worker.runner.logn.scales(positions.to(device), seq_len - 1)
                    if worker.runner.logn is not None else None),
        block_tables=tables.to(device), slot_mapping=slots.to(device),
        query_start_loc_list=starts, seq_lens_list=[seq_len] * num_seqs)
    ids = torch.randint(0, 151643, (num_seqs * q_len,), device=device)
    last = torch.tensor(starts[1:], device=device) - 1
    return ids, positions.to(device), meta, last


def time_ms(fn, device, reps: int) -> float:
    fn()  # warm-up (and the first launch's compile)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="7b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    parser.add_argument("--int4", action="store_true", help="GPTQ Int4 layout (random packed weights)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="three tiny shapes (plumbing check)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.layers < 1:
        parser.error("--reps and --layers must be positive")
    step_time_s = load_simulator()
    worker, shapes = build_worker(args)
    model, graphs, device = worker.model, worker.runner.decode_graphs, worker.device
    rows = []
    print(f"{args.preset} x {args.layers} layers{' Int4' if args.int4 else ''}, {worker.dtype}, {device}; "
          f"C = sum of sequence lengths; ms median of {args.reps}", flush=True)
    print(f"{'shape':24}{'T':>6}{'C':>8}{'eager ms':>10}{'graph ms':>10}{'formula ms':>12}{'ratio':>7}", flush=True)
    with torch.inference_mode():
        for name, num_seqs, q_len, seq_len in shapes:
            ids, positions, meta, last = step_inputs(worker, num_seqs, q_len, seq_len)
            eager = time_ms(lambda: model.compute_logits(model(ids, positions, meta).index_select(0, last)),
                            device, args.reps)
            graph = None
            if graphs is not None and graphs.can_run(num_seqs, meta):
                graph = time_ms(lambda: model.compute_logits(graphs.run(ids, positions, meta).index_select(0, last)),
                                device, args.reps)
            tokens, context = num_seqs * q_len, num_seqs * seq_len
            formula = step_time_s(tokens, context) * 1e3 if step_time_s else None
            measured = graph if graph is not None else eager
            rows.append(dict(shape=name, num_tokens=tokens, num_context_tokens=context, eager_ms=eager,
                             graph_ms=graph, formula_ms=formula,
                             measured_over_formula=measured / formula if formula else None))
            print(f"{name:24}{tokens:>6}{context:>8}{eager:>10.2f}"
                  f"{graph if graph is not None else float('nan'):>10.2f}"
                  f"{formula if formula else float('nan'):>12.2f}"
                  f"{measured / formula if formula else float('nan'):>7.2f}", flush=True)
    result = dict(vars(args), dtype=str(worker.dtype), device=str(device), results=rows,
                  simulator="benchmarks/simulated_device.py" if step_time_s else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if step_time_s is None:
        print(f"error: {SIMULATOR_MISSING}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
