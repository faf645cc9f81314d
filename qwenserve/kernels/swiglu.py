"""SwiGLU activation of Qwen's MLP: the up half times silu of the gate half.

    x [T, 2I]  = cat(w1(h), w2(h))   (up first, gate second: Qwen's w1, w2)
    swiglu(x) -> [T, I] = x[:, :I] * silu(x[:, I:])

silu is computed in fp32 and rounded to x's dtype before the product, which is
itself rounded once, matching `up * F.silu(gate)` in torch.
"""
import torch

from ._triton import tl, triton


@triton.jit
def _swiglu_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    up = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    gate = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (up.to(tl.float32) * act).to(up.dtype), mask=mask)


def swiglu(x):
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block = min(2048, triton.next_power_of_2(inter))
    _swiglu_kernel[(num_tokens, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out


def swiglu_ref(x):
    inter = x.shape[-1] // 2
    return x[..., :inter] * torch.nn.functional.silu(x[..., inter:].float()).to(x.dtype)
