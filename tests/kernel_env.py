"""Shared setup of the kernel tests: where they run, how close is close enough.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be
set before Triton is imported, so every kernel test module imports this file first. With
CUDA they run compiled, and the real-size tests (marked `cuda_only`) run too.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # running pytest from elsewhere without the package installed
    sys.path.insert(0, _ROOT)

from qwenserve.kernels import get_ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TRITON = get_ops(use_triton=True)
REF = get_ops(use_triton=False)

cuda_only = pytest.mark.skipif(
    not HAS_CUDA, reason="real-size (7B shapes) check: needs a CUDA GPU; the interpreter is too slow"
)

# fp32: accumulation order differs from torch. bf16/fp16: the result is rounded to a 7/10-bit
# mantissa (and the CPU interpreter truncates where the GPU rounds), so one or two ulps apart.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def assert_close(actual, expected, dtype=None, **override):
    tol = dict(TOLERANCES[dtype or expected.dtype])
    tol.update({k: v for k, v in override.items() if v is not None})
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def randn(*shape, dtype=torch.float32, generator=None):
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=DEVICE, dtype=dtype)
