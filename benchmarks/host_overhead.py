"""Host time of one engine step: everything but the model's arithmetic.

On a GPU the engine's own Python work per step (scheduling, block allocation, input tensors,
sampling bookkeeping, detokenization, stop checks, outputs) runs while the GPU waits, so it adds
to every step. This benchmark measures it on any machine: the model's forward and LM head are
replaced by stubs that return zeros of the right shape, so what is timed is the engine, the
scheduler, the runner's input preparation and (with `--sampler real`) the sampler on real-size
logits. Decode steps of `--batch-size` running requests, CPU time per step (less disturbed by
other processes than wall time), median over `--blocks` blocks of `--steps` steps.

    python benchmarks/host_overhead.py [--batch-size 1 32 256] [--sampler stub|real]
        [--repetition-penalty 1.1] [--prompt-len 128] [--json PATH]

`--sampler stub` returns a fixed token without looking at logits (the engine's own cost);
`--sampler real` samples greedily from random [B, 151936] logits made once (the sampler's host
and device work too, which on a CPU is dominated by its passes over the logits).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine import LLMEngine  # noqa: E402
from qwenserve.sampling_params import SamplingParams  # noqa: E402
from qwenserve.worker.sampler import DeviceSamples  # noqa: E402


def stub_model(engine: LLMEngine, real_sampler: bool) -> None:
    runner = engine.executor.worker.runner
    model = runner.model
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    model.forward = lambda ids, pos, meta: torch.zeros(ids.shape[0], hidden)
    logits = {}

    def compute_logits(h):
        rows = h.shape[0]
        if rows not in logits:
            logits[rows] = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))
        return logits[rows]

    model.compute_logits = compute_logits
    if not real_sampler:
        model.compute_logits = lambda h: torch.zeros(h.shape[0], 1)
        runner.sampler.sample_on_device = lambda _, states: DeviceSamples(
            torch.full((len(states),), 1000), [], [], None, None, None)


def measure(batch_size: int, args) -> dict:
    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", use_triton=False,
                                    max_num_seqs=max(batch_size, 1), kv_cache_memory=2 << 30))
    stub_model(engine, args.sampler == "real")
    total_steps = 1 + 10 + args.blocks * args.steps
    room = engine.max_model_len - args.prompt_len
    if room < total_steps:
        raise SystemExit(f"--prompt-len {args.prompt_len} leaves {room} tokens of the built-in model's "
                         f"max_model_len for {total_steps} steps; lower --prompt-len or --steps")
    params = SamplingParams(max_tokens=total_steps, temperature=0.0, ignore_eos=True,
                            repetition_penalty=args.repetition_penalty)
    for i in range(batch_size):
        engine.add_request(f"r{i}", prompt_token_ids=[100 + (i + j) % 5000 for j in range(args.prompt_len)],
                           params=params)
    for _ in range(11):  # the prefill, then a few decode steps to settle
        engine.step(finished_only=True)
    assert engine.scheduler.num_running == batch_size, "every request must be decoding"
    per_block = []
    for _ in range(args.blocks):
        start = time.process_time()
        for _ in range(args.steps):
            engine.step(finished_only=True)
        per_block.append((time.process_time() - start) / args.steps * 1e3)
    engine.shutdown()
    return dict(batch_size=batch_size, ms_per_step=statistics.median(per_block),
                us_per_request=statistics.median(per_block) * 1e3 / batch_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--sampler", choices=["stub", "real"], default="stub")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.batch_size) < 1 or args.steps < 1 or args.blocks < 1 or args.prompt_len < 1:
        parser.error("--batch-size, --steps, --blocks and --prompt-len must be positive")
    torch.set_num_threads(1)
    rows = [measure(b, args) for b in args.batch_size]
    print(f"sampler {args.sampler}, repetition_penalty {args.repetition_penalty}, prompt {args.prompt_len} tokens")
    print(f"{'batch':>6}{'ms/step':>10}{'us/request':>12}")
    for r in rows:
        print(f"{r['batch_size']:>6}{r['ms_per_step']:>10.3f}{r['us_per_request']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), results=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
