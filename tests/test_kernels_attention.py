"""Paged attention (prefill/mixed kernel and flash-decoding) against the block-table reference,
and the reference itself against dense scaled_dot_product_attention."""
import math

import kernel_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
import torch.nn.functional as F
from kernel_env import DEVICE, REF, TRITON, assert_close, cuda_only, randn

from qwenserve.kernels.paged_decode import paged_decode_attention


def make_batch(requests, block_size, num_heads, head_dim, dtype, num_kv_heads=None, logn=False,
               seed=0):
    """requests: list of (seq_len, q_len). Blocks are scattered in a shuffled cache whose unused
    slots hold random values, so reading past a sequence or through a wrong block shows."""
    num_kv_heads = num_kv_heads or num_heads
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [math.ceil(s / block_size) for s, _ in requests]
    num_blocks = 1 + sum(blocks_per_req) + 3  # block 0 stays the null block
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(blocks_per_req) + 1
    block_tables = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    for b, n in enumerate(blocks_per_req):
        block_tables[b, :n] = torch.tensor([order.pop() for _ in range(n)])
    q_lens = [q for _, q in requests]
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    num_tokens = sum(q_lens)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return dict(
        q=randn(num_tokens, num_heads, head_dim, dtype=dtype, generator=gen),
        k_cache=randn(*cache_shape, dtype=dtype, generator=gen),
        v_cache=randn(*cache_shape, dtype=dtype, generator=gen),
        query_start_loc=query_start_loc.to(DEVICE),
        seq_lens=torch.tensor([s for s, _ in requests], dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        scale=1.0 / math.sqrt(head_dim),
        logn_scale=(1.0 + 0.5 * torch.rand(num_tokens, generator=gen)).to(DEVICE) if logn else None,
        max_query_len=max(q_lens),
        max_seq_len=max(s for s, _ in requests),
    )


BS = 4  # small blocks: many boundaries inside small sequences
# Whole prompts of 1 token, exactly one block, one past a block, several blocks; a chunk
# starting mid-sequence on cached context (prefix hit / chunked prefill); two decode tokens.
MIXED = [(1, 1), (BS, BS), (BS + 1, BS + 1), (2 * BS + 3, 2 * BS + 3), (37, 10), (9, 1), (BS, 1)]
DECODE = [(1, 1), (BS, 1), (BS + 1, 1), (50, 1), (7, 1), (2 * BS, 1)]


@pytest.mark.parametrize("dtype,head_dim,logn", [
    (torch.float32, 32, False),
    (torch.float32, 32, True),
    (torch.bfloat16, 64, True),
    (torch.float16, 32, False),
])
def test_prefill_mixed_batch(dtype, head_dim, logn):
    batch = make_batch(MIXED, BS, 2, head_dim, dtype, logn=logn)
    out = TRITON.paged_attention(**batch)
    assert out.shape == batch["q"].shape and out.dtype == dtype
    assert_close(out, REF.paged_attention(**batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_128_prefill_and_decode(dtype):
    batch = make_batch([(20, 20), (16, 3), (5, 1)], BS, 1, 128, dtype, logn=True)
    assert_close(TRITON.paged_attention(**batch), REF.paged_attention(**batch))
    batch = make_batch([(20, 1), (16, 1), (5, 1)], BS, 1, 128, dtype, logn=True)
    assert_close(TRITON.paged_attention(**batch), REF.paged_attention(**batch))


def test_prefill_block_size_16_and_grouped_kv_heads():
    batch = make_batch([(16, 16), (17, 17), (40, 5), (33, 1)], 16, 4, 32, torch.float32,
                       num_kv_heads=2, logn=True)
    assert_close(TRITON.paged_attention(**batch), REF.paged_attention(**batch))


@pytest.mark.parametrize("dtype,logn", [(torch.float32, False), (torch.float32, True),
                                        (torch.bfloat16, True)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_batch(dtype, logn, num_splits):
    batch = make_batch(DECODE, BS, 2, 32, dtype, logn=logn)
    expected = REF.paged_attention(**batch)
    args = {k: v for k, v in batch.items() if k != "max_query_len"}
    assert_close(paged_decode_attention(**args, num_splits=num_splits), expected)


def test_dispatcher_uses_decode_path_and_skips_empty_requests():
    batch = make_batch([(12, 1), (5, 1), (30, 1)], BS, 2, 32, torch.float32, logn=True)
    # The middle request has no token this step (e.g. a padded CUDA-graph slot).
    batch["query_start_loc"] = torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=DEVICE)
    batch["q"] = batch["q"][:2]
    batch["logn_scale"] = batch["logn_scale"][:2]
    assert_close(TRITON.paged_attention(**batch), REF.paged_attention(**batch))


def test_decode_with_more_splits_than_tiles():
    # Splits past the end of a short sequence must contribute nothing.
    batch = make_batch([(3, 1), (70, 1)], BS, 2, 32, torch.float32)
    args = {k: v for k, v in batch.items() if k != "max_query_len"}
    assert_close(paged_decode_attention(**args, num_splits=5), REF.paged_attention(**batch))


@pytest.mark.parametrize("num_splits", [None, 7])
def test_decode_with_max_seq_len_far_above_the_batch(num_splits):
    # Under CUDA graphs max_seq_len is max_model_len whatever the contexts are: the splits
    # come from it, and each request still divides its own length among them.
    batch = make_batch([(3, 1), (70, 1), (33, 1), (16, 1)], BS, 2, 32, torch.float32, logn=True)
    args = {k: v for k, v in batch.items() if k != "max_query_len"}
    args["max_seq_len"] = 8192
    assert_close(paged_decode_attention(**args, num_splits=num_splits), REF.paged_attention(**batch))


# A mixed step as the model runner builds it: decode rows first (long contexts, so the decode
# kernel splits them), then prompts and chunks, one of them a single-token chunk after a decode.
DECODES_FIRST = [(50, 1), (9, 1), (BS, 1), (37, 1), (20, 20), (37, 10), (BS + 1, BS + 1), (6, 1)]


@pytest.mark.parametrize("dtype,logn,num_decodes", [
    (torch.float32, False, 4), (torch.float32, True, 1), (torch.bfloat16, True, 4),
    (torch.float16, False, 3),  # fewer than all q_len-1 rows: the others go through prefill
])
def test_mixed_step_decodes_first(dtype, logn, num_decodes):
    batch = make_batch(DECODES_FIRST, BS, 2, 32, dtype, logn=logn, seed=3)
    out = TRITON.paged_attention(**batch, num_decodes=num_decodes)
    assert_close(out, REF.paged_attention(**batch))
    # The reference does not depend on num_decodes (it finds q_len-1 rows itself).
    assert torch.equal(REF.paged_attention(**batch, num_decodes=num_decodes), REF.paged_attention(**batch))


def test_mixed_step_sends_decode_rows_to_the_decode_kernel(monkeypatch):
    from qwenserve.kernels import paged_attention as module

    calls = []
    real_decode, real_prefill = module.paged_decode_attention, module.paged_prefill_attention

    def decode(q, k_cache, v_cache, qsl, seq_lens, *args, **kwargs):
        calls.append(("decode", seq_lens.shape[0], 0))
        return real_decode(q, k_cache, v_cache, qsl, seq_lens, *args, **kwargs)

    def prefill(*args, first_request=0, **kwargs):
        calls.append(("prefill", args[4].shape[0], first_request))
        return real_prefill(*args, first_request=first_request, **kwargs)

    monkeypatch.setattr(module, "paged_decode_attention", decode)
    monkeypatch.setattr(module, "paged_prefill_attention", prefill)
    batch = make_batch(DECODES_FIRST, BS, 2, 32, torch.float32, seed=4)
    out = TRITON.paged_attention(**batch, num_decodes=4)
    # The decode kernel sees the 4 decode requests; the prefill kernel starts after them.
    assert calls == [("decode", 4, 0), ("prefill", len(DECODES_FIRST), 4)]
    assert_close(out, REF.paged_attention(**batch))
    calls.clear()
    TRITON.paged_attention(**batch)  # without num_decodes: every row through the prefill kernel
    assert calls == [("prefill", len(DECODES_FIRST), 0)]


def dense_attention(q, k, v, scale, logn):
    """SDPA on contiguous K/V; queries are the last q_len of seq_len positions."""
    q_len, seq_len = q.shape[0], k.shape[0]
    q = q * logn[:, None, None] if logn is not None else q
    allowed = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - q_len, seq_len)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=allowed.to(q.device), scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("logn", [False, True])
def test_reference_matches_dense_sdpa(logn):
    """Builds each request's K/V contiguously, stores it through store_kv_ref with a slot mapping,
    and checks the paged reference against SDPA on the contiguous tensors."""
    batch = make_batch(MIXED, BS, 2, 32, torch.float64, logn=logn)
    k_cache, v_cache = batch["k_cache"], batch["v_cache"]
    expected = torch.empty_like(batch["q"])
    starts = batch["query_start_loc"].tolist()
    for b, seq_len in enumerate(batch["seq_lens"].tolist()):
        k = randn(seq_len, 2, 32, dtype=torch.float64)
        v = randn(seq_len, 2, 32, dtype=torch.float64)
        pos = torch.arange(seq_len, device=DEVICE)
        slots = batch["block_tables"][b].long()[pos // BS] * BS + pos % BS
        REF.store_kv(k, v, k_cache, v_cache, slots)
        qs = slice(starts[b], starts[b + 1])
        logn_b = batch["logn_scale"][qs].double() if logn else None
        expected[qs] = dense_attention(batch["q"][qs], k, v, batch["scale"], logn_b)
    torch.testing.assert_close(REF.paged_attention(**batch), expected, rtol=1e-10, atol=1e-10)


def test_get_ops_namespaces():
    names = ["store_kv", "paged_attention", "apply_rotary", "rms_norm", "add_rms_norm", "swiglu"]
    for ops in (TRITON, REF):
        assert all(callable(getattr(ops, n)) for n in names)
    assert REF.paged_attention.__name__ == "paged_attention_ref"
    assert TRITON.paged_attention.__name__ == "paged_attention"


@cuda_only
@pytest.mark.parametrize("num_seqs,context", [(64, 4096), (1, 32768)])
def test_decode_at_7b_shapes(num_seqs, context):
    lens = [context - 37 * i for i in range(num_seqs)]
    batch = make_batch([(s, 1) for s in lens], 16, 32, 128, torch.bfloat16, logn=True)
    assert_close(TRITON.paged_attention(**batch), REF.paged_attention(**batch))


@cuda_only
def test_prefill_at_7b_shapes():
    requests = [(2048, 2048), (1000, 1000), (3000, 512), (4096, 1), (17, 17)]
    batch = make_batch(requests, 16, 32, 128, torch.bfloat16, logn=True)
    assert_close(TRITON.paged_attention(**batch), REF.paged_attention(**batch))
