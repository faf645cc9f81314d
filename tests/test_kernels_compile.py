"""Every Triton kernel compiles for an H100 (sm_90) with the GPU's tile sizes, within its shared
memory and without register spills: tests/compile_kernels.py, run in a subprocess because this
process has the interpreter on. No GPU needed: Triton's wheel carries the compiler and ptxas.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from qwenserve.kernels._triton import AUTO_MARKER

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_kernels.py")


def _has_nvidia_backend():
    try:
        return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton with its NVIDIA backend is not installed")
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               TRITON_DEFAULT_FP_FUSION="1")
    # Any test that imported the kernels left this process's automatic TRITON_INTERPRET=1 marked
    # as automatic; inherited with the mark, the script would decide again (no CUDA: interpret)
    # over the "0" set above, and compile nothing.
    env.pop(AUTO_MARKER, None)
    result = subprocess.run([sys.executable, _SCRIPT, "--arch", "90"], env=env, capture_output=True,
                            text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    # Every wrapper launched something: 2 models x 3 dtypes x (store_kv, 2 prefill, 2 x 2 decode,
    # rotary, 2 norms, swiglu) + GPTQ 2 dtypes x (16-row kernel, large-tile kernel).
    assert len(compiled) == 2 * 3 * 11 + 4, report
    for kernel in ("_store_kv_kernel", "_prefill_kernel", "_split_kernel", "_reduce_kernel",
                   "_rotary_kernel", "_rms_norm_kernel", "_swiglu_kernel", "_gptq_matmul_kernel",
                   "_gptq_gemm_kernel"):
        assert any(kernel in line for line in compiled), kernel


def test_triton_floor_is_the_oldest_version_ci_compiles():
    """setup.py may not promise a triton that no CI run has compiled the kernels with: its floor
    is the oldest `triton==X` that .ci/run compiles with (the venv's newest is newer still)."""
    root = os.path.dirname(os.path.dirname(_SCRIPT))
    with open(os.path.join(root, "setup.py")) as f:
        floor = re.search(r'"triton>=([\d.]+)"', f.read()).group(1)
    with open(os.path.join(root, ".ci", "run")) as f:
        compiled = re.findall(r"triton==([\d.]+)", f.read())
    assert compiled, ".ci/run no longer compiles with a pinned triton"
    def version(text):  # "3.6" and "3.6.0" are the same release
        parts = [int(p) for p in text.split(".")]
        return tuple(parts + [0] * (3 - len(parts)))

    assert version(floor) == min(map(version, compiled)), (floor, compiled)
