"""GPTQ Int4 matmul: the Triton kernel (interpreted on the CPU) against `gptq_matmul_ref`, and
the reference's dequantization against an independent bit-by-bit unpacking and against the
fp weights that were quantized.

Packed weights are random 32-bit words (every nibble 0..15, negative int32 words included),
never zeros, so a wrong shift, mask or zero convention cannot hide.
"""
import kernel_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
from kernel_env import DEVICE, REF, TRITON, assert_close, cuda_only

from qwenserve.kernels import gptq_matmul as gptq
from qwenserve.model.quant import quantize_gptq


def random_packed(k: int, n: int, group_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def words(*shape):
        return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)

    qweight, qzeros = words(k // 8, n), words(k // group_size, n // 8)
    # Scales of a few percent keep products in range for fp16/bf16 outputs.
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 0.002).to(torch.float16)
    return qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE)


def unpack_bit_by_bit(qweight, qzeros, scales, group_size):
    """Independent dequantization: assembles every 4-bit value one bit at a time from the
    unsigned 32-bit words, then applies AutoGPTQ's `zero - 1` storage convention."""
    qw = qweight.cpu().to(torch.int64) & 0xFFFFFFFF
    qz = qzeros.cpu().to(torch.int64) & 0xFFFFFFFF
    k, n = qw.shape[0] * 8, qw.shape[1]
    q = torch.zeros(k, n, dtype=torch.int64)
    z = torch.zeros(qz.shape[0], n, dtype=torch.int64)
    for nibble in range(8):
        for bit in range(4):
            pos = 4 * nibble + bit
            q[nibble::8] += ((qw >> pos) & 1) << bit   # rows 8i + nibble live in word row i
            z[:, nibble::8] += ((qz >> pos) & 1) << bit  # columns 8j + nibble in word column j
    w = torch.empty(k, n, dtype=torch.float64)
    for row in range(k):
        g = row // group_size
        w[row] = scales[g].cpu().double() * (q[row] - (z[g] + 1)).double()
    return w


# fp32: accumulation order only. bf16: inputs and outputs rounded to 8 bits of mantissa: a few
# output ulps of results up to ~8, hence 2e-2 relative and absolute (kernel_env.TOLERANCES).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_fused_kernel_matches_reference(dtype, num_tokens):
    k, n, group = 256, 72, 128  # n not a multiple of the 64-column tile: the edge is masked
    qweight, qzeros, scales = random_packed(k, n, group, seed=num_tokens)
    x = torch.randn(num_tokens, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = TRITON.gptq_matmul(x, qweight, qzeros, scales, group)
    assert out.shape == (num_tokens, n) and out.dtype == dtype
    assert_close(out, REF.gptq_matmul(x, qweight, qzeros, scales, group))


# Steps above FUSED_MAX_TOKENS (prefill, mixed steps) take the large-tile kernel, which also
# dequantizes in registers: row counts that are not multiples of its tile, more row tiles than one
# program group (GROUP_M = 8 tiles of 64 rows in the interpreter), N not a multiple of the column
# tile, and a group size below 128.
@pytest.mark.parametrize("dtype,num_tokens,k,n,group", [
    (torch.float32, gptq.FUSED_MAX_TOKENS + 1, 256, 72, 128),
    (torch.bfloat16, 130, 256, 200, 128),
    (torch.float16, 130, 128, 48, 32),
    (torch.float32, 600, 128, 136, 64),  # 10 row tiles: a full group of 8, then a partial one
])
def test_large_steps_take_the_tiled_kernel(dtype, num_tokens, k, n, group, monkeypatch):
    qweight, qzeros, scales = random_packed(k, n, group, seed=num_tokens)
    x = torch.randn(num_tokens, k, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    launched = []
    original = gptq._gptq_gemm_kernel.run

    def recording_run(*args, **kwargs):
        launched.append(kwargs.get("grid"))
        return original(*args, **kwargs)

    monkeypatch.setattr(gptq._gptq_gemm_kernel, "run", recording_run)
    out = TRITON.gptq_matmul(x, qweight, qzeros, scales, group)
    assert len(launched) == 1  # one launch of the tiled kernel, no dense weight
    assert out.shape == (num_tokens, n) and out.dtype == dtype
    expected = REF.gptq_matmul(x.float(), qweight, qzeros, scales, group)
    # fp32: accumulation order only. fp16/bf16: x and the weight rounded to 11/8 bits, and the
    # interpreter truncates conversions where the GPU rounds: each product carries a relative
    # error, so a sum that cancels is off by a fraction of its terms' size, not of its own. The
    # bound is relative to the output's scale, as in the real-size test.
    atol = 1e-4 if dtype == torch.float32 else 1e-2 * float(expected.abs().max())
    torch.testing.assert_close(out.float(), expected, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=atol)


def test_no_dense_weight_for_large_steps(monkeypatch):
    """The dense [K, N] weight is never materialised on the Triton path, whatever the step size."""
    monkeypatch.setattr(gptq, "dequantize_gptq", lambda *a, **k: pytest.fail("dense dequantization"))
    qweight, qzeros, scales = random_packed(128, 16, 128, seed=6)
    for tokens in (1, gptq.FUSED_MAX_TOKENS, gptq.FUSED_MAX_TOKENS + 1, 257):
        out = TRITON.gptq_matmul(torch.randn(tokens, 128).to(DEVICE), qweight, qzeros, scales, 128)
        assert out.shape == (tokens, 16)


def test_strided_input_rows():
    qweight, qzeros, scales = random_packed(128, 32, 128, seed=4)
    x = torch.randn(6, 200).to(DEVICE)[:, :128]  # row stride 200
    assert_close(TRITON.gptq_matmul(x, qweight, qzeros, scales, 128),
                 REF.gptq_matmul(x, qweight, qzeros, scales, 128))


def test_reference_dequantization_matches_bit_by_bit_unpacking():
    for group in (32, 128):
        qweight, qzeros, scales = random_packed(256, 24, group, seed=group)
        expected = unpack_bit_by_bit(qweight, qzeros, scales, group)
        # Exact: q - z - 1 is a small integer and times an fp16 scale is exact in fp32.
        torch.testing.assert_close(gptq.dequantize_gptq(qweight, qzeros, scales, group).double().cpu(),
                                   expected, rtol=0, atol=0)


def test_quantize_round_trip_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 384, generator=gen) * 0.05  # [out, in], as a checkpoint stores it
    weight[3, :128] = 0.0  # an all-zero group must not divide by zero
    packed = quantize_gptq(weight, 128)
    assert packed["qweight"].shape == (48, 48) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (3, 6) and packed["scales"].shape == (3, 48)
    assert packed["scales"].dtype == torch.float16
    torch.testing.assert_close(packed["g_idx"], torch.arange(384, dtype=torch.int32) // 128)
    # Symmetric GPTQ: zero 8 stored as 7 in every nibble (AutoGPTQ's zero - 1).
    assert (packed["qzeros"] == 0x77777777).all()
    dense = gptq.dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], 128)  # [in, out]
    step = packed["scales"].float().repeat_interleave(128, dim=0)
    error = (dense - weight.t()).abs()
    # Half a quantization step (plus float rounding of the division) from the original weight.
    assert (error <= step / 2 * (1 + 1e-5) + 1e-9).all(), float((error - step / 2).max())
    assert float(dense[:128, 3].abs().max()) == 0.0
    # And the levels span the 4-bit range (-amax lands on 0 or 1), not a collapsed one.
    q = gptq.unpack_int4_rows(packed["qweight"])
    assert int(q.min()) <= 1 and int(q.max()) == 15


def test_shape_errors_are_clear():
    qweight, qzeros, scales = random_packed(128, 16, 128)
    with pytest.raises(ValueError, match="qzeros has shape"):
        REF.gptq_matmul(torch.randn(2, 128), qweight, qzeros[:, :1], scales, 128)
    with pytest.raises(ValueError, match="K=256"):
        TRITON.gptq_matmul(torch.randn(2, 256).to(DEVICE), qweight, qzeros, scales, 128)


@cuda_only
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_size_72b_mlp(num_tokens, dtype):
    # Qwen-72B at tp = 8: w1|w2 shard [8192 -> 2 x 3072].
    k, n, group = 8192, 6144, 128
    qweight, qzeros, scales = random_packed(k, n, group, seed=7)
    x = (torch.randn(num_tokens, k, device=DEVICE) * 0.1).to(dtype)
    out = TRITON.gptq_matmul(x, qweight, qzeros, scales, group)
    expected = REF.gptq_matmul(x.float(), qweight, qzeros, scales, group)
    # Sums of 8192 products rounded in fp16/bf16: relative to the output scale.
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2 * float(expected.abs().max()))
