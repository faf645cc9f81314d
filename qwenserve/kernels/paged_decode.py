"""Flash-decoding over the paged KV cache: every request has exactly one query token.

    q                [T, H, D]            token of request b is row query_start_loc[b]
    k_cache, v_cache [N, block_size, Hkv, D]
    query_start_loc  [B + 1] int32        a request with no token (qsl[b+1] == qsl[b]) is skipped
    seq_lens         [B] int32
    block_tables     [B, M] int32
    logn_scale       [T] float32 | None
    -> out           [T, H, D]

Decode attention is a pure read of the cache. One program per (request, head) leaves most of
the GPU idle when there are few, long sequences, so the KV range [0, max_seq_len) is cut into
`num_splits` equal parts, one program per (request, head, split); each writes an unnormalised
partial output with its running max and sum, and `_reduce_kernel` merges the splits of a
(request, head). The number of splits comes from runtime sizes only (batch, heads, max_seq_len,
SM count), never from a constexpr, so nothing recompiles from batch to batch. Each request cuts
its OWN length into `num_splits` whole tiles, not max_seq_len: under CUDA graphs max_seq_len is
max_model_len, and cutting that would leave a short sequence in one or two busy splits.
"""
import torch

from . import _triton
from ._triton import compiled_launch, tl, triton

_LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs the parallelism gained
_SM_COUNT = {}


# Per-step ints are not specialized on (== 1, % 16): a new value must not mean a new compile.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr,
    qsl_ptr, seq_lens_ptr, block_tables_ptr, logn_ptr,
    part_out_ptr, part_m_ptr, part_l_ptr,
    scale_log2e, kv_group, num_heads, num_splits,
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_bt,
    HAS_LOGN: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q_start:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    # Whole tiles per split, so only a split's last tile is partial.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    kv_start = split * split_len
    kv_end = tl.minimum(seq_len, kv_start + split_len)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    part = (b.to(tl.int64) * num_heads + h) * num_splits + split

    token = q_start.to(tl.int64)
    q = tl.load(q_ptr + token * stride_qt + h * stride_qh + offs_d * stride_qd, mask=d_ok, other=0.0)
    q_scale = scale_log2e
    if HAS_LOGN:
        q_scale = q_scale * tl.load(logn_ptr + token)
    q = q.to(tl.float32) * q_scale
    kv_h = h // kv_group
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt

    # Splits past the end of a short sequence run zero iterations and record an empty
    # partial (m = -inf, l = 0), which the reduction weighs by exactly zero.
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(kv_start, kv_end, BLOCK_N):
        kv_pos = start + offs_n
        kv_ok = kv_pos < kv_end
        block_ids = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
        kv_off = block_ids * stride_cb + (kv_pos % BLOCK_SIZE) * stride_co + kv_h * stride_ch
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        # Both tiles are requested before any math so their loads are in flight together.
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd, mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(kv_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    tl.store(part_out_ptr + part * HEAD_DIM + offs_d, acc, mask=d_ok)
    tl.store(part_m_ptr + part, m_i)
    tl.store(part_l_ptr + part, l_i)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(
    part_out_ptr, part_m_ptr, part_l_ptr, out_ptr, qsl_ptr,
    num_heads, num_splits,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q_start:
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    first = (b.to(tl.int64) * num_heads + h) * num_splits
    m_max = float("-inf")
    for s in range(0, num_splits):
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + first + s))
    # An empty sequence (seq_len 0) has no finite max: its output is zeros.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    l_sum = 0.0
    for s in range(0, num_splits):
        w = tl.exp2(tl.load(part_m_ptr + first + s) - m_max)
        l_sum += w * tl.load(part_l_ptr + first + s)
        acc += w * tl.load(part_out_ptr + (first + s) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + h * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _sm_count(device):
    if device.type != "cuda":
        # interpreter: keep the program count small
        return _triton.COMPILE_ONLY_SM_COUNT if _triton.COMPILE_ONLY else 4
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def choose_num_splits(num_seqs, num_heads, max_seq_len, device):
    """Enough (request, head, split) programs to give every SM several, no split under
    _MIN_SPLIT_TOKENS tokens (smaller on the CPU interpreter, so tests exercise splitting)."""
    target_programs = 8 * _sm_count(device)
    min_split = _MIN_SPLIT_TOKENS if compiled_launch(device) else 16
    wanted = triton.cdiv(target_programs, max(1, num_seqs * num_heads))
    return max(1, min(wanted, triton.cdiv(max(1, max_seq_len), min_split)))


def paged_decode_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                           logn_scale, max_seq_len, num_splits=None, out=None):
    """Writes the rows of requests [0, B) of `out` (allocated when None: [T, H, D] like q)."""
    num_tokens, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_heads, max_seq_len, q.device)
    block_n = 64 if compiled_launch(q.device) else 16
    part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32,
                           device=q.device)
    part_m = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _split_kernel[(num_seqs, num_heads, num_splits)](
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
        logn_scale if logn_scale is not None else q,
        part_out, part_m, part_l,
        float(scale) * _LOG2E, num_heads // k_cache.shape[2], num_heads, num_splits,
        *q.stride(), *k_cache.stride(), block_tables.stride(0),
        HAS_LOGN=logn_scale is not None, BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4, num_stages=3,
    )
    _reduce_kernel[(num_seqs, num_heads)](
        part_out, part_m, part_l, out, query_start_loc, num_heads, num_splits, *out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=1,
    )
    return out
