"""GPTQ Int4 matmul: `x @ W` where W is a 4-bit GPTQ weight dequantized tile by tile.

    x        [T, K]       fp16 / bf16 / fp32 (row stride free, unit column stride)
    qweight  [K/8, N]     int32: 8 4-bit values packed along K, low nibble first
                          q[k, n] = (qweight[k // 8, n] >> 4 * (k % 8)) & 0xF
    qzeros   [K/G, N/8]   int32: packed along N, low nibble first
                          zs[g, n] = (qzeros[g, n // 8] >> 4 * (n % 8)) & 0xF
    scales   [K/G, N]     fp16 (any float dtype works)
    out      [T, N]       x.dtype

    W[k, n] = scales[k // G, n] * (q[k, n] - (zs[k // G, n] + 1))

The `+ 1` is AutoGPTQ's convention (what the Qwen Int4 checkpoints were exported with): its
packer stores `zero - 1` in qzeros and its kernels add the 1 back. A symmetric 4-bit zero of 8
is therefore stored as 7 (every qzeros word 0x77777777). `g_idx` is not an input: with
`desc_act` false it is `arange(K) // G`, which the layers check when they load it.

`gptq_matmul` (Triton): two kernels of the same scheme, no dense copy of the weight ever made.
Each program owns an output tile and, per K step, loads the packed words of a [BLOCK_K, BLOCK_N]
weight tile, unpacks and scales it in registers and feeds it to `tl.dot` (fp32 accumulation).
  - T <= FUSED_MAX_TOKENS (decode): `_gptq_matmul_kernel`, 16-row tiles; the weight is read
    from memory once per 16 rows, which is what decode is bound by.
  - larger T (prefill, mixed steps): `_gptq_gemm_kernel`, tiles of 128 x 128 on the GPU, so each
    weight tile is unpacked once per 128 rows (the integer work stays small next to the
    tensor-core work), with programs ordered in groups of GROUP_M row tiles so that neighbouring
    programs share weight tiles in L2 (Triton's matmul tutorial ordering).
Which kernel runs is decided in Python, and each has fixed block sizes: T is never specialized on,
so no new compiled variant appears for a new batch size.

`gptq_matmul_ref` (torch): `dequantize_gptq` then `x @ W`, the math both paths must match.
"""
import torch

from ._triton import compiled_launch, tl, triton

# Tokens above which the large-tile kernel takes over from the 16-row one (see the docstring).
FUSED_MAX_TOKENS = 64
_BLOCK_M, _BLOCK_N, _BLOCK_K = 16, 64, 32


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R/8, C] int32 -> [R, C] int32 in 0..15: value r sits in word r // 8 at bits 4*(r % 8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF
    return nibbles.reshape(packed.shape[0] * 8, packed.shape[1])


def unpack_int4_cols(packed: torch.Tensor) -> torch.Tensor:
    """[R, C/8] int32 -> [R, C] int32 in 0..15: value c sits in word c // 8 at bits 4*(c % 8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF
    return nibbles.reshape(packed.shape[0], packed.shape[1] * 8)


def check_gptq_shapes(k: int, qweight, qzeros, scales, group_size: int) -> None:
    n = qweight.shape[1]
    if k % group_size or group_size % 8:
        raise ValueError(f"gptq_matmul: K={k} must be a multiple of group_size={group_size}, "
                         f"itself a multiple of 8")
    groups = k // group_size
    expected = {"qweight": (k // 8, n), "qzeros": (groups, n // 8), "scales": (groups, n)}
    for name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"gptq_matmul: {name} has shape {list(tensor.shape)}, expected "
                             f"{list(expected[name])} for K={k}, N={n}, group_size={group_size}")
    if n % 8:
        raise ValueError(f"gptq_matmul: N={n} must be a multiple of 8 (qzeros packs 8 columns a word)")


def dequantize_gptq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """The dense [K, N] float32 weight (x @ it is the layer's matmul; it is the fp weight transposed)."""
    q = unpack_int4_rows(qweight)
    zeros = unpack_int4_cols(qzeros) + 1  # AutoGPTQ stores zero - 1
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    return (q - zeros[groups]).float() * scales.float()[groups]


def gptq_matmul_ref(x, qweight, qzeros, scales, group_size: int):
    check_gptq_shapes(x.shape[-1], qweight, qzeros, scales, group_size)
    # Rounded to x's dtype first, as the kernel feeds tl.dot in x's dtype.
    return x @ dequantize_gptq(qweight, qzeros, scales, group_size).to(x.dtype)


@triton.jit
def _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, offs_k, offs_n, mask_n, group,
                  stride_qw, stride_qz, stride_s):
    """[BLOCK_K, BLOCK_N] float32 weight tile whose rows offs_k all lie in quantization `group`."""
    packed = tl.load(qweight_ptr + (offs_k // 8)[:, None] * stride_qw + offs_n[None, :],
                     mask=mask_n[None, :], other=0)
    q = (packed >> ((offs_k % 8) * 4)[:, None]) & 0xF  # & drops the sign bits of the shift
    packed_z = tl.load(qzeros_ptr + group * stride_qz + offs_n // 8, mask=mask_n, other=0)
    zero = ((packed_z >> ((offs_n % 8) * 4)) & 0xF) + 1  # AutoGPTQ stores zero - 1
    scale = tl.load(scales_ptr + group * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return (q - zero[None, :]).to(tl.float32) * scale[None, :]


@triton.jit(do_not_specialize=["num_tokens"])  # changes every step
def _gptq_matmul_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, num_tokens, n, k,
                        group_size, stride_x, stride_qw, stride_qz, stride_s, stride_out,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < num_tokens, offs_n < n
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # BLOCK_K divides group_size (checked by the caller), so a K tile never straddles groups
    # and K is a whole number of tiles: no mask along K.
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, offs_k, offs_n, mask_n,
                          k0 // group_size, stride_qw, stride_qz, stride_s).to(a.dtype)
        if UPCAST_DOT:  # w is already rounded to x's dtype; only the product is widened
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:  # fp32 inputs: full precision, not TF32, so the result matches the reference
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    tl.store(out_ptr + rows[:, None] * stride_out + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["num_tokens"])  # changes every step
def _gptq_gemm_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, num_tokens, n, k,
                      group_size, stride_x, stride_qw, stride_qz, stride_s, stride_out,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """`_gptq_matmul_kernel` for many rows: large tiles, grouped program order (one 1-D grid)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(num_tokens, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    # GROUP_M row tiles take the column tiles in turn: the programs running together read the
    # same few weight tiles (and the same few x tiles), which then come from L2.
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < num_tokens, offs_n < n
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):  # BLOCK_K divides group_size: one group per K tile
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, offs_k, offs_n, mask_n,
                          k0 // group_size, stride_qw, stride_qz, stride_s).to(a.dtype)
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    tl.store(out_ptr + rows[:, None] * stride_out + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _gemm_config(dtype, device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of `_gptq_gemm_kernel`. On the GPU: the
    largest tiles that compile for sm_90 without register spills (tests/compile_kernels.py); fp32
    dots run on FMA units and hold twice the bytes, hence the smaller fp32 tile."""
    if not compiled_launch(device):
        return 64, 64, _BLOCK_K, 4, 1  # interpreter: few programs
    if dtype == torch.float32:
        return 64, 64, _BLOCK_K, 4, 2
    return 128, 128, _BLOCK_K, 8, 3


def _check_inputs(k, qweight, group_size):
    # Only what would make the kernel read out of bounds: the layers validate every shape when
    # they load, and this runs on every decode step, so it stays cheap.
    if k != qweight.shape[0] * 8 or group_size % _BLOCK_K or k % group_size:
        raise ValueError(f"gptq_matmul: K={k}, qweight {list(qweight.shape)} and group_size "
                         f"{group_size} disagree (K = 8 * qweight rows, a multiple of group_size, "
                         f"itself a multiple of {_BLOCK_K})")


def gptq_matmul(x, qweight, qzeros, scales, group_size: int):
    assert x.dim() == 2, "gptq_matmul takes a flat [T, K] batch"
    num_tokens, k = x.shape
    _check_inputs(k, qweight, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    n = qweight.shape[1]
    out = torch.empty((num_tokens, n), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    # The CPU interpreter's tl.dot multiplies bf16 operands as their raw 16-bit patterns
    # (triton 3.9), so there the operands are widened to fp32 first (as paged_attention does).
    upcast = not compiled_launch(x.device) and x.dtype == torch.bfloat16
    args = (x, qweight, qzeros, scales, out, num_tokens, n, k, group_size, x.stride(0),
            qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0))
    if num_tokens <= FUSED_MAX_TOKENS:
        grid = (triton.cdiv(num_tokens, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
        _gptq_matmul_kernel[grid](*args, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
                                  IEEE=x.dtype == torch.float32, UPCAST_DOT=upcast, num_warps=4)
        return out
    block_m, block_n, block_k, num_warps, num_stages = _gemm_config(x.dtype, x.device)
    grid = (triton.cdiv(num_tokens, block_m) * triton.cdiv(n, block_n),)
    _gptq_gemm_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                            IEEE=x.dtype == torch.float32, UPCAST_DOT=upcast,
                            num_warps=num_warps, num_stages=num_stages)
    return out
