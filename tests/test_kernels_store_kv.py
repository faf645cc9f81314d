"""Writing K/V into the paged cache: Triton kernel against its reference (exact copies)."""
import kernel_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
from kernel_env import DEVICE, REF, TRITON, cuda_only, randn


def caches(num_blocks, block_size, num_heads, head_dim, dtype):
    k_cache = randn(num_blocks, block_size, num_heads, head_dim, dtype=dtype)
    return k_cache, randn(num_blocks, block_size, num_heads, head_dim, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_with_skipped_slots(dtype):
    block_size, num_heads, head_dim = 4, 3, 32
    # k, v as strided thirds of a fused qkv: the token stride is 3 * H * D.
    qkv = randn(6, 3, num_heads, head_dim, dtype=dtype)
    k, v = qkv[:, 1], qkv[:, 2]
    # Slots across blocks, including the last offset of a block, and two padding tokens.
    slots = torch.tensor([5, -1, 3, 4, 19, -1], dtype=torch.int64, device=DEVICE)
    k_cache, v_cache = caches(6, block_size, num_heads, head_dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    TRITON.store_kv(k, v, k_cache, v_cache, slots)
    REF.store_kv(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[4, 3], v[4])


def test_store_kv_leaves_other_slots_alone():
    k_cache, v_cache = caches(3, 4, 2, 16, torch.float32)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k, v = randn(2, 2, 16), randn(2, 2, 16)
    TRITON.store_kv(k, v, k_cache, v_cache, torch.tensor([-1, 6], device=DEVICE))
    changed = (k_cache != k_before).flatten(2).any(-1)
    assert changed.nonzero().tolist() == [[1, 2]]
    assert torch.equal(k_cache[1, 2], k[1]) and torch.equal(v_cache[1, 2], v[1])
    v_before[1, 2] = v[1]
    assert torch.equal(v_cache, v_before)


def test_store_kv_many_heads_split_across_programs():
    # 40 heads x 128 exceeds one program's 4K elements, so heads are split into groups.
    k_cache, v_cache = caches(2, 16, 40, 128, torch.bfloat16)
    k, v = randn(3, 40, 128, dtype=torch.bfloat16), randn(3, 40, 128, dtype=torch.bfloat16)
    slots = torch.tensor([0, 17, 31], device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    TRITON.store_kv(k, v, k_cache, v_cache, slots)
    REF.store_kv(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@cuda_only
def test_store_kv_at_7b_shapes():
    k_cache, v_cache = caches(4096, 16, 32, 128, torch.bfloat16)
    k, v = randn(4096, 32, 128, dtype=torch.bfloat16), randn(4096, 32, 128, dtype=torch.bfloat16)
    slots = torch.randperm(4096 * 16, device=DEVICE)[:4096]
    slots[::7] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    TRITON.store_kv(k, v, k_cache, v_cache, slots)
    REF.store_kv(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
