"""Rotary position embedding, in place, rotate-half (GPT-NeoX) layout over the whole head.

    q [T, Hq, D], k [T, Hk, D]   modified in place; may be strided views of a fused qkv
    positions  [T] int64          position of each token in its sequence
    rope_theta [T] float32        base per token: Qwen's dynamic NTK gives every
                                  request its own base, so batches mix bases

Pairs are (i, i + D/2). inv_freq_i = theta^(-2i/D) and angle = position * inv_freq
in fp32; out = x * cos + rotate_half(x) * sin in fp32, cast back.

Angles reach tens of thousands of radians at long context. The kernel reduces them modulo
2*pi first (Cody-Waite, exact up to ~2^16 turns) so sin/cos only ever see [-pi, pi], where
every implementation tl.sin/tl.cos may lower to (fast approximate or libdevice) is accurate.
"""
import math

import torch

from ._triton import tl, triton

_TWO_PI_HI = 6.28125  # 8 significant bits, so k * _TWO_PI_HI is exact in fp32
_TWO_PI_LO = 2.0 * math.pi - _TWO_PI_HI
_INV_TWO_PI = 1.0 / (2.0 * math.pi)


@triton.jit
def _rotate(ptr, t, num_heads, stride_t, stride_h, stride_d, cos, sin,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < num_heads) & (i[None, :] < HALF)
    base = ptr + t * stride_t + h[:, None] * stride_h + i[None, :] * stride_d
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF * stride_d, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(base, (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(base + HALF * stride_d, (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, theta_ptr,
    num_q_heads, num_k_heads,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    two_pi_hi, two_pi_lo, inv_two_pi,
    HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    theta = tl.load(theta_ptr + t).to(tl.float64)
    i = tl.arange(0, BLOCK_HALF)
    # fp32 exp2(e * log2(theta)) is off by several ulps (the rounding of e * log2(theta) ~ 13
    # is amplified by exp2), which at position 30k moves the angle by 1e-3 rad; fp64 for these
    # D/2 values per token costs nothing and lands within an ulp of torch's fp32 pow.
    exponent = (2 * i).to(tl.float64) / HEAD_DIM
    inv_freq = (1.0 / tl.exp2(exponent * tl.log2(theta))).to(tl.float32)
    angle = pos * inv_freq
    turns = tl.floor(angle * inv_two_pi + 0.5)
    reduced = (angle - turns * two_pi_hi) - turns * two_pi_lo
    cos = tl.cos(reduced)
    sin = tl.sin(reduced)
    _rotate(q_ptr, t, num_q_heads, stride_qt, stride_qh, stride_qd, cos, sin,
            HEAD_DIM // 2, BLOCK_HQ, BLOCK_HALF)
    _rotate(k_ptr, t, num_k_heads, stride_kt, stride_kh, stride_kd, cos, sin,
            HEAD_DIM // 2, BLOCK_HK, BLOCK_HALF)


def apply_rotary(q, k, positions, rope_theta):
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, rope_theta,
        num_q_heads, k.shape[1],
        *q.stride(), *k.stride(),
        _TWO_PI_HI, _TWO_PI_LO, _INV_TWO_PI,
        HEAD_DIM=head_dim,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        num_warps=4,
    )


def _rotate_ref(x, cos, sin):
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def apply_rotary_ref(q, k, positions, rope_theta):
    head_dim = q.shape[-1]
    exponent = torch.arange(0, head_dim, 2, device=q.device).float() / head_dim
    inv_freq = 1.0 / (rope_theta.float()[:, None] ** exponent)
    angle = positions.float()[:, None] * inv_freq
    emb = torch.cat((angle, angle), dim=-1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    q.copy_(_rotate_ref(q, cos, sin))
    k.copy_(_rotate_ref(k, cos, sin))
