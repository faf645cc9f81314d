"""Causal attention over the paged KV cache for a flat batch of mixed requests.

    q                [T, H, D]              T = all query tokens of the step, request by request
    k_cache, v_cache [N, block_size, Hkv, D]
    query_start_loc  [B + 1] int32          request b owns q rows qsl[b] : qsl[b+1]
    seq_lens         [B] int32              tokens of request b in the cache, new ones included
    block_tables     [B, M] int32           cache block ids of request b, in order
    logn_scale       [T] float32 | None     Qwen's logn factor, multiplies q of token t
    num_decodes      int                    the first num_decodes requests have q_len 1
    -> out           [T, H, D]              dtype of q

The q_len_b query tokens of request b are its LAST positions: seq_len_b - q_len_b .. seq_len_b - 1,
so one batch mixes decode tokens (q_len 1), whole prompts and chunks that start mid-sequence
(chunked prefill, prefix-cache hits); their own K/V are already in the cache. Softmax is fp32.

Two kernels: `_prefill_kernel` here (a program per (request, query tile, head) walking the
request's blocks up to its causal limit, online softmax, tl.dot) serves any request;
`paged_decode.py` splits each q_len-1 sequence's KV range across programs (flash-decoding) so that
a few long sequences still fill the GPU. A mixed step (decodes next to a prompt chunk) uses both:
the model runner puts its decode rows first (`num_decodes`, as vLLM reorders its batch), the
decode kernel takes requests [0, num_decodes) and the prefill kernel the rest, into one output.
Without the split a decode row would be a 1-of-128-rows tile of the prefill kernel, one program
per head walking the whole sequence unsplit. The prefill kernel takes the full per-request
arrays and an offset (`first_request`), not views that start mid-array: a view's pointer
alignment would change with num_decodes and select a new compiled variant.

`max_query_len` and `max_seq_len` only size the grids; under CUDA graphs pass fixed upper
bounds (e.g. max_model_len) so the grid stays the same from replay to replay.
"""
import math

import torch
import torch.nn.functional as F

from ._triton import compiled_launch, tl, triton
from .paged_decode import paged_decode_attention

_LOG2E = 1.4426950408889634


# The block table's width and the number of decode rows change from step to step: not
# specialized on (a compile per value class).
@triton.jit(do_not_specialize=["stride_bt", "first_request"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, block_tables_ptr, logn_ptr,
    scale_log2e, kv_group, first_request,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_bt,
    HAS_LOGN: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    b = tl.program_id(0) + first_request
    m_block = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    context_len = seq_len - q_len
    kv_h = h // kv_group

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    tokens = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    # Scores go to base 2 so the softmax can use exp2; logn folds into the per-row scale.
    row_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale_log2e
    if HAS_LOGN:
        row_scale = row_scale * tl.load(logn_ptr + tokens, mask=row_ok, other=1.0)
    q_pos = context_len + offs_m

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys past the last query row of this tile are masked for every row: stop there.
    kv_end = tl.minimum(seq_len, context_len + (m_block + 1) * BLOCK_M)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        kv_pos = start + offs_n
        kv_ok = kv_pos < kv_end
        block_ids = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
        kv_off = (block_ids * stride_cb + (kv_pos % BLOCK_SIZE) * stride_co + kv_h * stride_ch)
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd, mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * row_scale[:, None]
        visible = (kv_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; shift by 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _prefill_config(head_dim, dtype, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). On the GPU: the largest tiles that compile for
    sm_90 without spilling registers (ptxas -v, checked by tests/compile_kernels.py). fp32 dots
    run on FMA units, not tensor cores, and hold twice the bytes, hence smaller fp32 tiles."""
    if not compiled_launch(device):
        return 16, 32, 4, 1  # interpreter: few, small programs
    if dtype == torch.float32:
        return (32, 64, 8, 2) if head_dim > 64 else (64, 32, 8, 2)
    return (128, 64, 8, 2) if head_dim > 64 else (64, 64, 4, 2)


def paged_prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                            scale, logn_scale, max_query_len, first_request=0, out=None):
    """Requests [first_request, B) of the batch; writes only their rows of `out`."""
    num_tokens, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0] - first_request
    if num_tokens == 0 or num_seqs <= 0 or max_query_len <= 0:
        return out
    block_m, block_n, num_warps, num_stages = _prefill_config(head_dim, q.dtype, q.device)
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    # The CPU interpreter's tl.dot multiplies bf16 operands as their raw 16-bit patterns
    # (triton 3.9), so there the operands are widened to fp32 first.
    upcast = not compiled_launch(q.device) and q.dtype == torch.bfloat16
    _prefill_kernel[grid](
        q, k_cache, v_cache, out,
        query_start_loc, seq_lens, block_tables,
        logn_scale if logn_scale is not None else q,
        float(scale) * _LOG2E, num_heads // k_cache.shape[2], first_request,
        *q.stride(), *out.stride(), *k_cache.stride(), block_tables.stride(0),
        HAS_LOGN=logn_scale is not None, BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        UPCAST_DOT=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                    logn_scale, max_query_len, max_seq_len, num_decodes=0):
    assert k_cache.stride() == v_cache.stride() and q.shape[1] % k_cache.shape[2] == 0
    if max_query_len == 1:
        return paged_decode_attention(q, k_cache, v_cache, query_start_loc, seq_lens,
                                      block_tables, scale, logn_scale, max_seq_len)
    if num_decodes <= 0:
        return paged_prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                                       scale, logn_scale, max_query_len)
    # Prefix views (same data pointers as the full arrays) for the decode rows.
    out = paged_decode_attention(q, k_cache, v_cache, query_start_loc[:num_decodes + 1],
                                 seq_lens[:num_decodes], block_tables[:num_decodes], scale,
                                 logn_scale, max_seq_len)
    return paged_prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                                   scale, logn_scale, max_query_len, first_request=num_decodes,
                                   out=out)


def paged_attention_ref(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                        logn_scale, max_query_len, max_seq_len, num_decodes=0):
    """Gathers each request's K/V through its block table and attends with an explicit mask.

    Decode requests (q_len 1) are attended together as one padded batch, since the CPU engine
    runs this reference every step; prompts and chunks are attended one request at a time.
    It finds the q_len-1 rows itself, wherever they are: `num_decodes` is only the Triton path's.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math; fp64 stays fp64
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]

    def gather(cache, tables):  # [B, W] block ids -> [B, heads, W * block_size, D]
        kv = cache.index_select(0, tables.flatten().long()).view(
            tables.shape[0], -1, num_kv_heads, head_dim).to(acc)
        if group > 1:  # grouped KV heads (Qwen-1 itself has none)
            kv = kv.repeat_interleave(group, dim=2)
        return kv.transpose(1, 2)

    def attend(rows, q_positions, seq_lens_b, tables):
        """rows [B, Q] query rows of q; q_positions [B, Q]; -> writes out[rows]."""
        qb = q[rows].to(acc)  # [B, Q, H, D]
        if logn_scale is not None:
            qb = qb * logn_scale[rows].to(acc)[..., None, None]
        k, v = gather(k_cache, tables), gather(v_cache, tables)
        k_pos = torch.arange(k.shape[2], device=q.device)
        allowed = (k_pos[None, None, :] <= q_positions[:, :, None]) & \
                  (k_pos[None, None, :] < seq_lens_b[:, None, None])
        o = F.scaled_dot_product_attention(qb.transpose(1, 2), k, v, attn_mask=allowed[:, None],
                                           scale=scale)
        out[rows] = o.transpose(1, 2).to(q.dtype)

    decode = [b for b in range(len(lens)) if q_lens[b] == 1 and lens[b] > 0]
    if decode:
        width = math.ceil(max(lens[b] for b in decode) / block_size)
        seq = torch.tensor([lens[b] for b in decode], device=q.device)
        attend(torch.tensor([[starts[b]] for b in decode], device=q.device), (seq - 1)[:, None], seq,
               block_tables[decode, :width])
    for b, seq_len in enumerate(lens):
        q_len = q_lens[b]
        if q_len <= 1 or seq_len == 0:
            continue
        width = math.ceil(seq_len / block_size)
        rows = torch.arange(starts[b], starts[b + 1], device=q.device)[None]
        positions = torch.arange(seq_len - q_len, seq_len, device=q.device)[None]
        attend(rows, positions, torch.tensor([seq_len], device=q.device), block_tables[b:b + 1, :width])
    return out
