"""RMSNorm, the fused residual-add RMSNorm and SwiGLU: Triton kernels against their references."""
import kernel_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
import torch.nn.functional as F
from kernel_env import DEVICE, REF, TRITON, assert_close, cuda_only, randn

EPS = 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 80), (3, 256)])
def test_rms_norm(dtype, num_tokens, hidden):
    x = randn(num_tokens, hidden, dtype=dtype) * 3
    w = randn(hidden, dtype=dtype)
    out = TRITON.rms_norm(x, w, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, REF.rms_norm(x, w, EPS))


def test_rms_norm_reference_is_qwens_formula():
    x = randn(5, 64, dtype=torch.bfloat16)
    w = randn(64, dtype=torch.bfloat16)
    xf = x.double()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w
    assert_close(REF.rms_norm(x, w, EPS), expected)


def test_rms_norm_strided_rows():
    base = randn(6, 128)
    x = base[:, :96]  # row stride 128, hidden 96
    w = randn(96)
    assert_close(TRITON.rms_norm(x, w, EPS), REF.rms_norm(x, w, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(dtype):
    x, res = randn(9, 96, dtype=dtype), randn(9, 96, dtype=dtype)
    w = randn(96, dtype=dtype)
    x_before, res_before = x.clone(), res.clone()
    out, new_res = TRITON.add_rms_norm(x, res, w, EPS)
    ref_out, ref_res = REF.add_rms_norm(x, res, w, EPS)
    assert new_res.dtype == dtype and out.dtype == dtype
    assert_close(new_res, ref_res)
    assert_close(out, ref_out)
    assert torch.equal(x, x_before) and torch.equal(res, res_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,inter", [(1, 16), (5, 88), (2, 2500)])
def test_swiglu(dtype, num_tokens, inter):
    x = randn(num_tokens, 2 * inter, dtype=dtype) * 4
    out = TRITON.swiglu(x)
    assert out.shape == (num_tokens, inter) and out.dtype == dtype
    assert_close(out, REF.swiglu(x))


def test_swiglu_reference_is_up_times_silu_gate():
    x = randn(4, 64, dtype=torch.float64)
    up, gate = x[:, :32], x[:, 32:]
    torch.testing.assert_close(REF.swiglu(x), up * gate * torch.sigmoid(gate))
    torch.testing.assert_close(REF.swiglu(x), up * F.silu(gate))


@cuda_only
def test_norms_at_7b_shapes():
    x, res = randn(4096, 4096, dtype=torch.bfloat16), randn(4096, 4096, dtype=torch.bfloat16)
    w = randn(4096, dtype=torch.bfloat16)
    assert_close(TRITON.rms_norm(x, w, EPS), REF.rms_norm(x, w, EPS))
    out, new_res = TRITON.add_rms_norm(x, res, w, EPS)
    ref_out, ref_res = REF.add_rms_norm(x, res, w, EPS)
    assert_close(new_res, ref_res)
    assert_close(out, ref_out)
    mlp = randn(2048, 2 * 11008, dtype=torch.bfloat16)
    assert_close(TRITON.swiglu(mlp), REF.swiglu(mlp))
