"""Writing new tokens' K/V into the paged cache.

    k, v             [T, H, D]          may be strided views (thirds of a fused qkv)
    k_cache, v_cache [N, block_size, H, D]
    slot_mapping     [T] int64           slot = block_id * block_size + offset; -1 = skip

Token t goes to `cache[slot // block_size, slot % block_size]`. Padding tokens
(CUDA-graph batches, discarded positions) carry slot -1 and are not written.
"""
import torch

from ._triton import tl, triton


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_heads,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_co, stride_ch, stride_cd,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    # slot is int64, so the cache offset cannot overflow on caches > 2^31 elements.
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_heads) & (d[None, :] < HEAD_DIM)
    src_k = t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd
    src_v = t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd
    dst = block * stride_cb + offset * stride_co + h[:, None] * stride_ch + d[None, :] * stride_cd
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src_v, mask=mask), mask=mask)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride() and k_cache.shape[2:] == (num_heads, head_dim)
    block_d = triton.next_power_of_2(head_dim)
    # About 4K elements per program: one program per token at 7B shapes.
    block_h = max(1, min(triton.next_power_of_2(num_heads), 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        num_heads,
        *k.stride(), *v.stride(), *k_cache.stride(),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_D=block_d,
    )


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)
