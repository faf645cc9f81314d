"""The one place the kernel modules import Triton from, and where a process decides whether its
Triton kernels run compiled or under the interpreter.

Without CUDA, compiled Triton kernels cannot run, so the interpreter (`TRITON_INTERPRET=1`) is
switched on before Triton is first imported; that is how CI checks the kernels on the CPU.
`triton.jit` reads the variable when a kernel is decorated, which is why it must happen here and
not in the tests.

Every process decides for itself (`decide_interpreter`): environment variables pass to child
processes (a Ray raylet started by a CPU-only driver, the ranks it starts), and a GPU rank that
inherited a CPU driver's `TRITON_INTERPRET=1` would interpret every kernel. So a value this module
set is marked (`QWENSERVE_TRITON_INTERPRET_AUTO=1`) and a process that inherits it decides again
from its own devices; a value the user set (no mark) is the user's choice and is kept.

If Triton is not installed at all, a stand-in keeps the modules importable so
the torch references (`*_ref`) still work; `HAS_TRITON` says which case holds.

`compiled_launch(device)` is how a kernel wrapper decides between GPU tile sizes and the small
ones the interpreter can afford. `tests/compile_kernels.py` turns on `COMPILE_ONLY` to compile
every kernel for an H100 on a machine with no GPU, with the GPU's tile sizes.
"""
import os

import torch

INTERPRET_VAR = "TRITON_INTERPRET"
# Set beside INTERPRET_VAR when this module switched the interpreter on (not the user).
AUTO_MARKER = "QWENSERVE_TRITON_INTERPRET_AUTO"


def decide_interpreter(environ, cuda_available: bool) -> bool:
    """Sets `environ`'s TRITON_INTERPRET for a process that does (not) see CUDA; returns whether
    the interpreter is on. A value marked as set automatically in an ancestor process is dropped
    first: that process's devices are not this one's."""
    if environ.get(AUTO_MARKER) == "1":
        environ.pop(INTERPRET_VAR, None)
        environ.pop(AUTO_MARKER, None)
    if INTERPRET_VAR not in environ and not cuda_available:
        environ[INTERPRET_VAR] = "1"
        environ[AUTO_MARKER] = "1"
    return environ.get(INTERPRET_VAR, "0") not in ("", "0")


INTERPRETED = decide_interpreter(os.environ, torch.cuda.is_available())

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


__all__ = ["triton", "tl", "HAS_TRITON", "INTERPRETED", "compiled_launch", "decide_interpreter"]
