"""Each process decides its own device environment: a GPU process never runs the Triton
interpreter because a CPU-only parent (the driver, or the raylet it started) switched it on, and
the Ray executor hands its ranks no TRITON_INTERPRET of the driver's."""
import os
import subprocess
import sys

import pytest

from qwenserve.kernels._triton import AUTO_MARKER, INTERPRET_VAR, decide_interpreter

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("environ,cuda,expected_on,expected_env", [
    # A CPU-only process with nothing set: the interpreter, marked as qwenserve's choice.
    ({}, False, True, {INTERPRET_VAR: "1", AUTO_MARKER: "1"}),
    # A GPU process with nothing set: compiled kernels, nothing written.
    ({}, True, False, {}),
    # A GPU process that inherited a CPU parent's automatic choice: dropped, compiled kernels.
    ({INTERPRET_VAR: "1", AUTO_MARKER: "1"}, True, False, {}),
    # A CPU process that inherited it: decided again, the same way.
    ({INTERPRET_VAR: "1", AUTO_MARKER: "1"}, False, True, {INTERPRET_VAR: "1", AUTO_MARKER: "1"}),
    # What the user set (no mark) is kept, either way.
    ({INTERPRET_VAR: "1"}, True, True, {INTERPRET_VAR: "1"}),
    ({INTERPRET_VAR: "0"}, False, False, {INTERPRET_VAR: "0"}),
])
def test_decide_interpreter(environ, cuda, expected_on, expected_env):
    environ = dict(environ)
    assert decide_interpreter(environ, cuda) is expected_on
    assert environ == expected_env


def _kernel_kind_in_child(env: dict, fake_cuda: bool) -> str:
    """The class of a Triton kernel object as a fresh process decorates it (InterpretedFunction
    under the interpreter, JITFunction compiled), with torch.cuda.is_available faked."""
    code = ("import torch\n"
            f"torch.cuda.is_available = lambda: {fake_cuda}\n"
            "from qwenserve.kernels import rms_norm\n"
            "print(type(rms_norm._rms_norm_kernel).__name__)\n")
    child_env = {k: v for k, v in os.environ.items() if k not in (INTERPRET_VAR, AUTO_MARKER)}
    child_env.update(env, PYTHONPATH=_ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_gpu_child_of_a_cpu_only_parent_compiles_its_kernels():
    # What a CPU-only driver leaves in its environment once qwenserve.kernels is imported.
    parent = {}
    decide_interpreter(parent, cuda_available=False)
    assert _kernel_kind_in_child(parent, fake_cuda=True) == "JITFunction"
    assert _kernel_kind_in_child(parent, fake_cuda=False) == "InterpretedFunction"


def test_ray_ranks_get_no_interpreter_from_the_driver(monkeypatch):
    pytest.importorskip("ray")
    from qwenserve.worker.ray_executor import _actor_env

    monkeypatch.setenv(INTERPRET_VAR, "1")  # a CPU-only driver, whether set by hand or by qwenserve
    monkeypatch.setenv(AUTO_MARKER, "1")
    monkeypatch.setenv("QWENSERVE_DIST_TIMEOUT_S", "30")
    gpu = _actor_env(2, "10.0.0.2", gpu=True)
    assert gpu[INTERPRET_VAR] == "0" and AUTO_MARKER not in gpu
    assert gpu["QWENSERVE_DIST_TIMEOUT_S"] == "30"  # qwenserve's own settings still travel
    cpu = _actor_env(2, "10.0.0.2", gpu=False)
    assert INTERPRET_VAR not in cpu and AUTO_MARKER not in cpu  # the rank decides (_triton.py)
