"""Compiles every Triton kernel for an H100 (sm_90) on a machine with no GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but not whether they
compile: it accepts loop-carried values that change type, block shapes the compiler rejects,
bf16 `tl.dot` operands it never sees (it upcasts them), and tiles that need more shared memory
than the GPU has. This script runs each kernel wrapper exactly as the engine calls it, at real
shapes and with the GPU's tile sizes, through Triton's normal launch path up to the point where
the compiled kernel would be launched, and stops there (a warm-up). Compilation goes all the
way to a cubin with the ptxas that ships in Triton's wheel.

    TRITON_INTERPRET=0 python tests/compile_kernels.py [--arch 90] [--quick]

Prints one line per compiled kernel (shared memory, warps, registers and spills as ptxas -v
reports them) and exits non-zero if any compile fails, needs more shared memory than the GPU
allows, or spills registers to local memory (a tile too large for the register file: slow), or
if a kernel compiles again when only the batch changes (batch size, block-table width, token
count: values Triton would otherwise specialize on, stalling a serving step on a JIT compile). Run by
tests/test_kernels_compile.py in a subprocess, since the test process itself has the
interpreter on.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels.py needs TRITON_INTERPRET=0: it compiles, the interpreter does not")
os.environ["TRITON_INTERPRET"] = "0"  # kernels/_triton.py would otherwise switch it on (no CUDA)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

from qwenserve.kernels import _triton, gptq_matmul, paged_attention, paged_decode  # noqa: E402
from qwenserve.kernels import rms_norm, rotary, store_kv, swiglu  # noqa: E402

# Opt-in shared memory per block (bytes): H100 227 KB, A100 163 KB.
MAX_SHARED = {90: 232448, 80: 166912}


class _CompileOnlyDriver:
    """Just enough of a Triton driver for compiling: a device, a stream, a target."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class Recorder:
    """Turns every `kernel[grid](...)` into a compile without a launch, and keeps the result."""

    def __init__(self):
        self.compiled = []
        self._saved = None

    def __enter__(self):
        recorder = self
        self._saved = KernelInterface.__getitem__

        def warm_up_instead(kernel, grid):
            def launch(*args, **kwargs):
                compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
                recorder.compiled.append((kernel, compiled))
                return compiled
            return launch

        KernelInterface.__getitem__ = warm_up_instead
        return self

    def __exit__(self, *exc):
        KernelInterface.__getitem__ = self._saved


def resource_usage(compiled, arch):
    """(registers, spill store bytes) of a compiled kernel, from `ptxas -v` on its PTX (the
    same ptxas Triton compiled it with)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        report = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o",
                                 os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True,
                                check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else 0


def _cases(quick):
    """(label, thunk) pairs: each thunk calls one wrapper as the engine does."""
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    shapes = {"7b": (32, 128, 4096, 11008), "tiny": (4, 32, 128, 256)}  # heads, head_dim, hidden, ffn
    block_size, num_blocks = 16, 64
    cases = []
    for model, (heads, head_dim, hidden, ffn) in shapes.items():
        for dtype in dtypes:
            def make(dtype=dtype, heads=heads, head_dim=head_dim, hidden=hidden, ffn=ffn):
                def t(*shape, dt=dtype):
                    return torch.randn(*shape).to(dt)

                k_cache, v_cache = t(num_blocks, block_size, heads, head_dim), t(num_blocks, block_size, heads, head_dim)
                tables = torch.arange(num_blocks, dtype=torch.int32).view(4, -1)

                def attention(q_lens, seq_lens, logn):
                    tokens = sum(q_lens)
                    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
                    q = t(tokens, 3 * heads, head_dim)[:, :heads]  # a strided view of fused qkv
                    logn_scale = torch.rand(tokens) + 1.0 if logn else None
                    paged_attention.paged_attention(
                        q, k_cache, v_cache, qsl, torch.tensor(seq_lens, dtype=torch.int32), tables,
                        head_dim ** -0.5, logn_scale, max(q_lens), max(seq_lens))

                def rope():
                    qkv = t(8, 3 * heads, head_dim)
                    rotary.apply_rotary(qkv[:, :heads], qkv[:, heads:2 * heads], torch.arange(8),
                                        torch.full((8,), 10000.0))

                return [
                    ("store_kv", lambda: store_kv.store_kv(
                        t(8, 3 * heads, head_dim)[:, heads:2 * heads], t(8, 3 * heads, head_dim)[:, 2 * heads:],
                        k_cache, v_cache, torch.arange(8, dtype=torch.long))),
                    ("prefill attention", lambda: attention([5, 40, 1, 17], [5, 100, 30, 17], logn=False)),
                    ("prefill attention + logn", lambda: attention([5, 40, 1, 17], [5, 100, 30, 17], logn=True)),
                    ("decode attention", lambda: attention([1, 1, 1, 1], [5, 100, 256, 17], logn=False)),
                    ("decode attention + logn", lambda: attention([1, 1, 1, 1], [5, 100, 256, 17], logn=True)),
                    ("rotary", rope),
                    ("rms_norm", lambda: rms_norm.rms_norm(t(8, hidden), t(hidden), 1e-6)),
                    ("add_rms_norm", lambda: rms_norm.add_rms_norm(t(8, hidden), t(8, hidden), t(hidden), 1e-6)),
                    ("swiglu", lambda: swiglu.swiglu(t(8, 2 * ffn))),
                ]
            for name, thunk in make():
                cases.append((f"{model} {str(dtype).removeprefix('torch.')} {name}", thunk))
    # GPTQ Int4 (the 72B-Chat-Int4 layer shapes, smaller N): fp16 activations, fp16 scales.
    k, n, group = 1024, 512, 128
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), dtype=torch.int32)
    scales = torch.rand(k // group, n).half()
    for dtype in dtypes[:2] if not quick else dtypes:
        for tokens in (4, gptq_matmul.FUSED_MAX_TOKENS + 1):  # 16-row kernel; large-tile kernel
            cases.append((f"gptq {str(dtype).removeprefix('torch.')} T={tokens}",
                          lambda dtype=dtype, tokens=tokens: gptq_matmul.gptq_matmul(
                              torch.randn(tokens, k).to(dtype), qweight, qzeros, scales, group)))
    return cases


def _stable_across_steps(recorder) -> list[str]:
    """Launches each step-shaped kernel for batches of different sizes and block-table widths, as
    successive engine steps would, and returns the kernels that compiled more than once: a value
    that changes from step to step must not select a new specialization (a JIT stall mid-serving)."""
    heads, head_dim, block_size = 32, 128, 16
    cache = torch.randn(200, block_size, heads, head_dim).to(torch.bfloat16)
    start = len(recorder.compiled)
    for num_seqs, width, q_len in [(1, 1, 1), (3, 16, 1), (7, 17, 1), (16, 33, 1), (2, 5, 9), (5, 32, 20),
                                   (1, 12, 100)]:
        tables = torch.randint(1, 200, (num_seqs, width), dtype=torch.int32)
        seq_lens = torch.full((num_seqs,), width * block_size, dtype=torch.int32)
        qsl = torch.arange(num_seqs + 1, dtype=torch.int32) * q_len
        q = torch.randn(num_seqs * q_len, 3 * heads, head_dim).to(torch.bfloat16)[:, :heads]
        paged_attention.paged_attention(q, cache, cache, qsl, seq_lens, tables, head_dim ** -0.5, None,
                                        q_len, width * block_size)
    # Mixed steps: the decode rows (first num_decodes requests) go to the decode kernels, the
    # rest to the prefill kernel at an offset; num_decodes changes from step to step.
    for q_lens, num_decodes in [([1, 1, 1, 9, 20], 3), ([1, 30], 1), ([1] * 6 + [5, 2], 6)]:
        num_seqs, width = len(q_lens), 12
        tables = torch.randint(1, 200, (num_seqs, width), dtype=torch.int32)
        seq_lens = torch.full((num_seqs,), width * block_size, dtype=torch.int32)
        qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        q = torch.randn(sum(q_lens), 3 * heads, head_dim).to(torch.bfloat16)[:, :heads]
        paged_attention.paged_attention(q, cache, cache, qsl, seq_lens, tables, head_dim ** -0.5, None,
                                        max(q_lens), width * block_size, num_decodes=num_decodes)
    k, n, group = 1024, 512, 128
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), dtype=torch.int32)
    scales = torch.rand(k // group, n).half()
    for tokens in (1, 2, 16, 33, 64, 65, 200, 1000):
        gptq_matmul.gptq_matmul(torch.randn(tokens, k).half(), qweight, qzeros, scales, group)
    compiled = {}
    for kernel, binary in recorder.compiled[start:]:
        compiled.setdefault(kernel.fn.__name__, set()).add(id(binary))
    return [f"{name} compiled {len(ids)} times" for name, ids in compiled.items() if len(ids) > 1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100)")
    parser.add_argument("--quick", action="store_true", help="bf16 only")
    args = parser.parse_args(argv)
    max_shared = MAX_SHARED.get(args.arch, 101376)

    triton_driver.set_active(_CompileOnlyDriver(args.arch))
    _triton.COMPILE_ONLY = True
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}, "
          f"shared memory limit {max_shared} B")
    failures = []
    with Recorder() as recorder:
        for label, thunk in _cases(args.quick):
            start = len(recorder.compiled)
            try:
                thunk()
            except Exception as exc:  # report every failing kernel, not just the first
                failures.append(label)
                print(f"FAIL {label}: {type(exc).__name__}: {exc}")
                traceback.print_exc(limit=-3)
                continue
            for kernel, compiled in recorder.compiled[start:]:
                shared = compiled.metadata.shared
                registers, spills = resource_usage(compiled, args.arch)
                problems = ([f"shared memory over {max_shared} B"] if shared > max_shared else []) + \
                    ([f"spills {spills} B of registers"] if spills else [])
                if problems:
                    failures.append(label)
                print(f"{'FAIL' if problems else 'ok':4} {label}: {kernel.fn.__name__} shared={shared} B "
                      f"warps={compiled.metadata.num_warps} stages={compiled.metadata.num_stages} "
                      f"registers={registers} spills={spills} B {'; '.join(problems)}")
        unstable = _stable_across_steps(recorder)
    for problem in unstable:
        print(f"FAIL step-to-step recompile: {problem}")
    failures += unstable
    print(f"{len(recorder.compiled)} kernels compiled, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
