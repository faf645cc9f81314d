"""Per-step cost of structured output's token masks, on the host, at a given batch size.

What one decode step adds for a batch whose every row is structured: `fill_bitmask` (each
row's matcher consumes its new token, then llguidance's thread pool computes every row's
mask) and `apply_bitmask_` on [B, 151936] float32 logits on the CPU (on a GPU the apply is a
few device kernels; the fill stays on the host either way). No model runs.

Workload: the 60 JSON schemas of tests/data/json_schemas.json (or the first --num-schemas). For each, one output is made
first by masked greedy decoding of fake logits (noise plus the test model's preference for
closing quotes and brackets, tests/structured_model.py), so it walks through keys, strings,
numbers and arrays and then ends. Row i of the batch replays these outputs one after the
other, starting with schema i % 60 (at a phase offset); each time it reaches an end token it
goes on with the next schema as a new request (a new matcher from the compile cache), as a
busy server's rows do. So every batch size sees the same mix, batch 1 included.

    python benchmarks/structured_output.py [--batch-size 1 64 256] [--steps 20] [--blocks 5]
        [--free-whitespace] [--num-schemas N] [--json PATH]

Reported per batch size: CPU time per step (process_time: every thread of the process,
llguidance's pool included) and wall time per step, each the median over blocks, for the
fill and for the apply, and per row.
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

from qwenserve.model.tokenizer import QwenTokenizer  # noqa: E402
from qwenserve.sampling_params import SamplingParams  # noqa: E402
from qwenserve.structured_output import StructuredOutput  # noqa: E402
from qwenserve.structured_output.batch import fill_bitmask  # noqa: E402
from qwenserve.structured_output.logits_mask import apply_bitmask_  # noqa: E402
from qwenserve.structured_output.vocabulary import END_TOKEN_IDS  # noqa: E402
from qwenserve.worker.sampler import SamplingState  # noqa: E402
from tests import structured_model  # noqa: E402

LOGITS_WIDTH = 151936
SCHEMAS_PATH = os.path.join(_REPO, "tests", "data", "json_schemas.json")


def preference_logits(tokenizer: QwenTokenizer) -> torch.Tensor:
    """[V] the closer-preferring model's bonuses (tests/structured_model.py), as a logits row."""
    bias = torch.zeros(LOGITS_WIDTH)
    for t in structured_model.closer_token_ids(tokenizer):
        quote = b'"' in tokenizer.id_to_bytes(t)
        bias[t] = structured_model.QUOTE_BONUS if quote else structured_model.BRACKET_BONUS
    bias[sorted(END_TOKEN_IDS)] = structured_model.END_BONUS
    bias[structured_model.whitespace_token_ids(tokenizer)] = structured_model.WHITESPACE_PENALTY
    return bias


def make_outputs(params: list[SamplingParams], bias: torch.Tensor, max_len: int = 64) -> list[list[int]]:
    """Per params, an output of masked greedy decoding of noise + `bias` (ends on an end token)."""
    states = [SamplingState(p, [0], []) for p in params]
    gen = torch.Generator().manual_seed(0)
    active = list(range(len(states)))
    for _ in range(max_len):
        rows = [states[i] for i in active]
        logits = torch.randn(len(rows), LOGITS_WIDTH, generator=gen) * 3 + bias
        apply_bitmask_(logits, fill_bitmask(rows))
        for s, token in zip(rows, logits.argmax(dim=-1).tolist()):
            s.output_token_ids.append(token)
        active = [i for i in active if states[i].output_token_ids[-1] not in END_TOKEN_IDS]
        if not active:
            break
    return [s.output_token_ids for s in states]


class ReplayRow:
    """One batch row replaying the schemas' outputs one after the other, from schema `start`
    at token `phase`; each output it reaches the end of is followed by the next schema's, as
    a new request (a new state and matcher)."""

    def __init__(self, params: list[SamplingParams], outputs: list[list[int]], start: int, phase: int):
        self.params, self.outputs = params, outputs
        self.schema = start % len(params)
        self.position = phase % len(outputs[self.schema])
        self.state = SamplingState(params[self.schema], [0], list(outputs[self.schema][:self.position]))

    def advance(self) -> None:
        if self.position == len(self.outputs[self.schema]):
            self.schema = (self.schema + 1) % len(self.params)
            self.position = 0
            self.state = SamplingState(self.params[self.schema], [0], [])
        self.state.output_token_ids.append(self.outputs[self.schema][self.position])
        self.position += 1


def measure(batch_size: int, params: list[SamplingParams], outputs: list[list[int]], args) -> dict:
    rows = [ReplayRow(params, outputs, start=i, phase=7 * (i // len(params)) + i) for i in range(batch_size)]
    logits = torch.randn(batch_size, LOGITS_WIDTH, generator=torch.Generator().manual_seed(batch_size))
    fill_cpu, fill_wall, apply_cpu = [], [], []
    for block in range(args.blocks + 1):  # block 0 warms up (first masks, allocator)
        f_cpu = f_wall = a_cpu = 0.0
        for _ in range(args.steps):
            for r in rows:
                r.advance()
            states = [r.state for r in rows]
            c0, w0 = time.process_time(), time.perf_counter()
            bitmask = fill_bitmask(states)
            c1, w1 = time.process_time(), time.perf_counter()
            apply_bitmask_(logits, bitmask)  # in place: the cost does not depend on the values
            c2 = time.process_time()
            f_cpu, f_wall, a_cpu = f_cpu + c1 - c0, f_wall + w1 - w0, a_cpu + c2 - c1
        if block:
            fill_cpu.append(f_cpu / args.steps * 1e3)
            fill_wall.append(f_wall / args.steps * 1e3)
            apply_cpu.append(a_cpu / args.steps * 1e3)
    fill_ms = statistics.median(fill_cpu)
    return dict(batch_size=batch_size, fill_cpu_ms=fill_ms, fill_wall_ms=statistics.median(fill_wall),
                apply_cpu_ms=statistics.median(apply_cpu), fill_cpu_us_per_row=fill_ms * 1e3 / batch_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--free-whitespace", action="store_true",
                        help="disable_any_whitespace=False (default: compact JSON)")
    parser.add_argument("--num-schemas", type=int, default=None, help="the first N schemas only")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.batch_size) < 1 or args.steps < 1 or args.blocks < 1 or (args.num_schemas or 1) < 1:
        parser.error("--batch-size, --steps, --blocks and --num-schemas must be positive")
    torch.set_num_threads(1)
    with open(SCHEMAS_PATH, encoding="utf-8") as f:
        schemas = [s["schema"] for s in json.load(f)][:args.num_schemas]
    params = [SamplingParams(structured_output=StructuredOutput(
        json_schema=s, disable_any_whitespace=not args.free_whitespace)) for s in schemas]
    outputs = make_outputs(params, preference_logits(QwenTokenizer()))
    results = [measure(b, params, outputs, args) for b in args.batch_size]
    lengths = sorted(len(o) for o in outputs)
    print(f"{len(schemas)} schemas, outputs of {lengths[0]}-{lengths[-1]} tokens (median "
          f"{lengths[len(lengths) // 2]}), {'free' if args.free_whitespace else 'compact'} whitespace, "
          f"{os.cpu_count()} CPUs")
    print(f"{'batch':>6}{'fill cpu ms':>13}{'fill wall ms':>14}{'us/row':>9}{'apply cpu ms':>14}")
    for r in results:
        print(f"{r['batch_size']:>6}{r['fill_cpu_ms']:>13.3f}{r['fill_wall_ms']:>14.3f}"
              f"{r['fill_cpu_us_per_row']:>9.1f}{r['apply_cpu_ms']:>14.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), cpus=os.cpu_count(), output_lengths=lengths, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
