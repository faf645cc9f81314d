"""Triton kernels, each with its plain-torch reference `*_ref` beside it (one file per kernel).

    store_kv.py         store_kv(k, v, k_cache, v_cache, slot_mapping)
    paged_attention.py  paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens,
                                        block_tables, scale, logn_scale, max_query_len, max_seq_len)
                        (prefill/mixed kernel; decode batches go to paged_decode.py)
    rotary.py           apply_rotary(q, k, positions, rope_theta)          in place
    rms_norm.py         rms_norm(x, weight, eps), add_rms_norm(x, residual, weight, eps)
    swiglu.py           swiglu(x)
    gptq_matmul.py      gptq_matmul(x, qweight, qzeros, scales, group_size)   GPTQ Int4 linear

`get_ops(use_triton)` hands the model one namespace of these, Triton or reference, so the
model code never branches on the device. Shapes are in each module's docstring.
"""
from types import SimpleNamespace

# Modules only, not their functions: a function bound here would shadow the module of the
# same name (`qwenserve.kernels.rms_norm` must stay the module).
from . import gptq_matmul, paged_attention, rms_norm, rotary, store_kv, swiglu
from ._triton import HAS_TRITON

_TRITON_OPS = SimpleNamespace(
    store_kv=store_kv.store_kv,
    paged_attention=paged_attention.paged_attention,
    apply_rotary=rotary.apply_rotary,
    rms_norm=rms_norm.rms_norm,
    add_rms_norm=rms_norm.add_rms_norm,
    swiglu=swiglu.swiglu,
    gptq_matmul=gptq_matmul.gptq_matmul,
)
_REFERENCE_OPS = SimpleNamespace(
    store_kv=store_kv.store_kv_ref,
    paged_attention=paged_attention.paged_attention_ref,
    apply_rotary=rotary.apply_rotary_ref,
    rms_norm=rms_norm.rms_norm_ref,
    add_rms_norm=rms_norm.add_rms_norm_ref,
    swiglu=swiglu.swiglu_ref,
    gptq_matmul=gptq_matmul.gptq_matmul_ref,
)


def get_ops(use_triton: bool) -> SimpleNamespace:
    """The kernel set: Triton kernels when `use_triton`, else the plain-torch references."""
    if use_triton and not HAS_TRITON:
        raise RuntimeError("use_triton=True but triton is not installed")
    return _TRITON_OPS if use_triton else _REFERENCE_OPS


__all__ = ["get_ops", "HAS_TRITON"]
