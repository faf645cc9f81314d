"""The one place the kernel modules import Triton from.

Without CUDA, compiled Triton kernels cannot run, so the interpreter
(`TRITON_INTERPRET=1`) is switched on before Triton is first imported; that is
how CI checks the kernels on the CPU. `triton.jit` reads the variable when a
kernel is decorated, which is why it must happen here and not in the tests.

If Triton is not installed at all, a stand-in keeps the modules importable so
the torch references (`*_ref`) still work; `HAS_TRITON` says which case holds.
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

__all__ = ["triton", "tl", "HAS_TRITON"]
