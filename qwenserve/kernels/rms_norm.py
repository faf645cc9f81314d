"""RMSNorm, alone and fused with the residual add before it.

    x, residual [T, hidden]   (last dimension contiguous)
    weight      [hidden]
    rms_norm(x, weight, eps) -> out [T, hidden]
    add_rms_norm(x, residual, weight, eps) -> (out, new_residual)

Numerics follow Qwen's RMSNorm exactly: the norm is taken in fp32, cast back to
x's dtype, then multiplied by the weight (`_norm(x.float()).type_as(x) * weight`),
so `out` has dtype promote(x, weight). In the fused form `new_residual = x + residual`
is rounded to x's dtype first and the norm is taken of that rounded sum, as the
unfused model would do.
"""
import torch

from ._triton import tl, triton


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    hidden, eps,
    stride_x, stride_res, stride_out, stride_new_res,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Rounded to the activation dtype before the norm, like the unfused model.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps):
    assert x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous()
    num_tokens, hidden = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_res = torch.empty_like(x) if residual is not None else None
    if num_tokens == 0:
        return out, new_res
    block = triton.next_power_of_2(hidden)
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1
    _rms_norm_kernel[(num_tokens,)](
        x, residual if residual is not None else x, weight, out,
        new_res if new_res is not None else out,
        hidden, float(eps),
        x.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), new_res.stride(0) if new_res is not None else 0,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(4, block // 512)),
    )
    return out, new_res


def rms_norm(x, weight, eps):
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x, residual, weight, eps):
    return _launch(x, residual, weight, eps)


def rms_norm_ref(x, weight, eps):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def add_rms_norm_ref(x, residual, weight, eps):
    new_residual = (x + residual).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
