"""The one place the kernel modules import Triton from.

Without CUDA, compiled Triton kernels cannot run, so the interpreter
(`TRITON_INTERPRET=1`) is switched on before Triton is first imported; that is
how CI checks the kernels on the CPU. `triton.jit` reads the variable when a
kernel is decorated, which is why it must happen here and not in the tests.

If Triton is not installed at all, a stand-in keeps the modules importable so
the torch references (`*_ref`) still work; `HAS_TRITON` says which case holds.

`compiled_launch(device)` is how a kernel wrapper decides between GPU tile sizes and the small
ones the interpreter can afford. `tests/compile_kernels.py` turns on `COMPILE_ONLY` to compile
every kernel for an H100 on a machine with no GPU, with the GPU's tile sizes.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - only on machines without triton
    HAS_TRITON = False

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, (int(n) - 1).bit_length())

    class tl:  # noqa: N801 - mirrors the real module's name
        constexpr = int

    triton = _MissingTriton()

# Only tests/compile_kernels.py sets these: launches compile for a GPU and run nothing.
COMPILE_ONLY = False
COMPILE_ONLY_SM_COUNT = 132  # an H100 SXM


def compiled_launch(device: torch.device) -> bool:
    """Whether kernels launched on `device` run compiled GPU code (so take GPU-sized tiles)."""
    return device.type == "cuda" or COMPILE_ONLY


__all__ = ["triton", "tl", "HAS_TRITON", "compiled_launch"]
