"""Rotary embedding (rotate-half, per-token theta): Triton kernel against its reference."""
import math

import kernel_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
from kernel_env import DEVICE, REF, TRITON, assert_close, cuda_only, randn


def fused_qk(num_tokens, num_heads, head_dim, dtype):
    """q and k as the model sees them: strided thirds of a fused qkv projection."""
    qkv = randn(num_tokens, 3 * num_heads * head_dim, dtype=dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : 2 * num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    return q, k


def run_both(q, k, positions, theta):
    q_ref, k_ref = q.clone(), k.clone()
    TRITON.apply_rotary(q, k, positions, theta)
    REF.apply_rotary(q_ref, k_ref, positions, theta)
    return q_ref, k_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_rotary_two_requests_with_different_theta(dtype, head_dim):
    # Request A (3 tokens, base 10000) and request B (4 tokens, NTK-scaled base) in one batch.
    positions = torch.tensor([0, 1, 2, 500, 501, 502, 503], device=DEVICE)
    theta = torch.tensor([10000.0] * 3 + [10000.0 * 3.0 ** (head_dim / (head_dim - 2))] * 4,
                         device=DEVICE)
    q, k = fused_qk(7, 3, head_dim, dtype)
    assert not q.is_contiguous()
    q_ref, k_ref = run_both(q, k, positions, theta)
    # Angles up to ~500 rad: one fp32 ulp of the angle is ~3e-5, well inside the tolerance.
    assert_close(q, q_ref, atol=2e-4 if dtype == torch.float32 else None)
    assert_close(k, k_ref, atol=2e-4 if dtype == torch.float32 else None)


def test_rotary_distinct_heads_for_q_and_k():
    q = randn(5, 4, 32)
    k = randn(5, 2, 32)
    positions = torch.arange(5, device=DEVICE) * 7
    theta = torch.full((5,), 10000.0, device=DEVICE)
    q_ref, k_ref = run_both(q, k, positions, theta)
    assert_close(q, q_ref)
    assert_close(k, k_ref)


def test_rotary_position_zero_is_identity():
    q, k = randn(2, 2, 32), randn(2, 2, 32)
    q0, k0 = q.clone(), k.clone()
    TRITON.apply_rotary(q, k, torch.zeros(2, dtype=torch.int64, device=DEVICE),
                        torch.full((2,), 10000.0, device=DEVICE))
    torch.testing.assert_close(q, q0)
    torch.testing.assert_close(k, k0)


def test_rotary_long_positions_as_accurate_as_the_reference():
    # At positions ~30k the fp32 angle itself is only good to ~2e-3 rad, for kernel and reference
    # alike; both are compared with a float64 evaluation of the same fp32 angles' formula.
    head_dim = 64
    positions = torch.tensor([20000, 30000, 32767, 12345], device=DEVICE)
    theta = torch.tensor([10000.0, 10000.0, 123456.0, 123456.0], device=DEVICE)
    q, k = randn(4, 2, head_dim), randn(4, 2, head_dim)
    exact_q = q.double().clone()
    exponent = torch.arange(0, head_dim, 2, device=DEVICE).double() / head_dim
    angle = positions.double()[:, None] / theta.double()[:, None] ** exponent
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x1, x2 = exact_q[..., : head_dim // 2], exact_q[..., head_dim // 2 :]
    exact_q = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    q_ref, _ = run_both(q, k, positions, theta)
    ref_err = (q_ref.double() - exact_q).abs().max().item()
    kernel_err = (q.double() - exact_q).abs().max().item()
    assert kernel_err <= 2 * ref_err + 1e-5, (kernel_err, ref_err)


def test_rotary_reference_matches_rotation_formula():
    # Rotating pair (i, i + D/2) by angle p * theta^(-2i/D), evaluated independently in float64.
    q, k = randn(3, 1, 16), randn(3, 1, 16)
    positions = torch.tensor([0, 3, 11], device=DEVICE)
    theta = torch.tensor([10000.0, 10000.0, 50000.0], device=DEVICE)
    expected = q.double().clone()
    for t in range(3):
        for i in range(8):
            a = positions[t].item() * theta[t].item() ** (-2 * i / 16)
            x1, x2 = q[t, 0, i].item(), q[t, 0, i + 8].item()
            expected[t, 0, i] = x1 * math.cos(a) - x2 * math.sin(a)
            expected[t, 0, i + 8] = x2 * math.cos(a) + x1 * math.sin(a)
    REF.apply_rotary(q, k, positions, theta)
    torch.testing.assert_close(q.double(), expected, rtol=1e-5, atol=1e-5)


@cuda_only
def test_rotary_at_7b_shapes():
    q, k = fused_qk(4096, 32, 128, torch.bfloat16)
    positions = torch.randint(0, 8192, (4096,), device=DEVICE)
    theta = torch.where(torch.arange(4096, device=DEVICE) < 2048, 10000.0, 40000.0).float()
    q_ref, k_ref = run_both(q, k, positions, theta)
    assert_close(q, q_ref)
    assert_close(k, k_ref)
