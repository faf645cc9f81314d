"""GPTQ Int4 linear layers (the Qwen-*-Int4 checkpoints), tensor-parallel, and the GPTQ packer.

A quantized linear of K inputs, N outputs and group size G holds in the checkpoint

    qweight int32 [K/8, N]    8 4-bit values packed along K, low nibble first
    qzeros  int32 [K/G, N/8]  packed along N; AutoGPTQ stores zero - 1 (7 for the symmetric 8)
    scales  fp16  [K/G, N]
    g_idx   int32 [K]         arange(K) // G (desc_act false: checked, then unused)
    bias    fp16  [N]         c_attn's real bias; all zeros for Qwen's bias-less linears,
                              which AutoGPTQ exports carry anyway: checked to be zero, else an
                              error (they are expected: the loader has no optional tensors)

and computes `x @ W + b` with W[k, n] = scales[k//G, n] * (q[k, n] - (qzeros[k//G, n] + 1))
through `ops.gptq_matmul` (kernels/gptq_matmul.py). Each parameter's `weight_loader` checks
the full checkpoint shape and reads only this rank's slice:

    column-parallel (c_attn, w1|w2)  split N: qweight/scales/bias columns, qzeros packed columns
                                     (N/tp must stay a multiple of 8: one qzeros word = 8 columns)
    fused c_attn                     q, k, v thirds first, then each third by heads
    merged w1 | w2                   local columns [w1 shard ; w2 shard] (up, then gate)
    row-parallel (c_proj)            split K in whole groups: qweight rows K/8/tp, qzeros and
                                     scales rows K/G/tp, g_idx; the bias is added after the
                                     all-reduce, once

`quantize_gptq` is the inverse (symmetric round-to-nearest per group, the layout above) used by
the random Int4 checkpoint maker and the tests.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from qwenserve.model.layers import TensorSource, check_shape, copy_into
from qwenserve.model.parallel import TensorParallelGroup, divide

PACK = 8  # 4-bit values per int32 word


def _param(*shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _check_g_idx(source: TensorSource, values: torch.Tensor, start: int, group_size: int) -> None:
    expected = torch.arange(start, start + values.numel(), device=values.device) // group_size
    if not torch.equal(values.to(expected.dtype), expected):
        raise ValueError(f"tensor {source.name}: g_idx is not arange(in_features) // {group_size}; "
                         f"act-order (desc_act) GPTQ checkpoints are not supported")


def _copy(param: torch.Tensor, piece: torch.Tensor, source: TensorSource) -> None:
    # Packed words converted from a float tensor would be silently wrong, so the kind must match.
    if piece.dtype.is_floating_point != param.dtype.is_floating_point:
        raise ValueError(f"tensor {source.name}: dtype {piece.dtype} where GPTQ stores "
                         f"{'a float' if param.dtype.is_floating_point else 'int32'} tensor")
    copy_into(param, piece)


class ZeroBiasCheck:
    """The `bias` a GPTQ export carries for a linear that has none: loads nothing, but a
    non-zero value would mean a model this code does not compute, so it is an error. Exports
    without these tensors load as well (`optional`)."""

    optional = True

    def __init__(self, out_features: int):
        self.out_features = out_features
        self.weight_loader = self.load

    def load(self, _param, source: TensorSource, **_shard) -> None:
        check_shape(source, (self.out_features,))
        if torch.count_nonzero(source.read()):
            raise ValueError(f"tensor {source.name}: non-zero bias for a layer without bias "
                             f"(config no_bias); this checkpoint does not match the Qwen architecture")


class GPTQLinear(nn.Module):
    """One GPTQ linear, column- or row-parallel.

    Column-parallel outputs are `segments` (widths), each split across ranks on its own and
    concatenated per rank: [N] for a plain layer, [h, h, h] for c_attn. With `shards`
    (merged w1 | w2) each segment is its own checkpoint tensor, picked by the `shard` keyword.
    """

    def __init__(self, in_features: int, segments: Sequence[int], parallel: str, bias: bool,
                 group_size: int, tp: TensorParallelGroup, ops, dtype: torch.dtype,
                 shards: Optional[Sequence[str]] = None):
        super().__init__()
        assert parallel in ("column", "row")
        self.tp, self.ops, self.parallel = tp, ops, parallel
        self.in_features, self.segments, self.shards = in_features, list(segments), shards
        self.out_features = sum(segments)
        self.group_size = in_features if group_size == -1 else group_size
        if in_features % self.group_size or self.group_size % PACK:
            raise ValueError(f"GPTQ: group size {self.group_size} must divide the input width "
                             f"{in_features} and be a multiple of {PACK}")
        if parallel == "column":
            self.seg_per_rank = [divide(s, tp.size, "the output width of a GPTQ column-parallel linear")
                                 for s in segments]
            for width in self.seg_per_rank:
                if width % PACK:
                    raise ValueError(f"GPTQ: tensor parallel size {tp.size} leaves {width} output columns "
                                     f"per rank, not a multiple of {PACK} (one qzeros word)")
            self.in_local, self.out_local = in_features, sum(self.seg_per_rank)
        else:
            groups = divide(in_features // self.group_size, tp.size,
                            f"the quantization groups of a GPTQ row-parallel linear (in {in_features} / "
                            f"group {self.group_size})")
            self.in_local, self.out_local = groups * self.group_size, self.out_features
            if self.out_features % PACK:
                raise ValueError(f"GPTQ: output width {self.out_features} is not a multiple of {PACK}")
        groups_local = self.in_local // self.group_size
        self.qweight = _param(self.in_local // PACK, self.out_local, dtype=torch.int32)
        self.qzeros = _param(groups_local, self.out_local // PACK, dtype=torch.int32)
        # Kept in fp16 whatever the compute dtype: bf16 would round the checkpoint's scales.
        self.scales = _param(groups_local, self.out_local, dtype=torch.float16)
        self.g_idx = _param(self.in_local, dtype=torch.int32)  # this rank's slice, as stored
        self.bias = _param(self.out_local, dtype=dtype) if bias else None
        self.zero_bias = None if bias else ZeroBiasCheck(self.out_features if shards is None
                                                         else segments[0])
        loader = self.load_columns if parallel == "column" else self.load_rows
        for p in (self.qweight, self.qzeros, self.scales, self.g_idx):
            p.weight_loader = loader
        if self.bias is not None:
            self.bias.weight_loader = loader if parallel == "column" else self.load_full_bias

    # ------------------------------------------------------------------ loading
    def _full_shape(self, param: torch.Tensor, out: int) -> tuple[int, ...]:
        """The unsharded checkpoint shape of `param` when the source holds `out` outputs."""
        k, groups = self.in_features, self.in_features // self.group_size
        if param is self.qweight:
            return (k // PACK, out)
        if param is self.qzeros:
            return (groups, out // PACK)
        if param is self.scales:
            return (groups, out)
        return (k,) if param is self.g_idx else (out,)

    def load_columns(self, param: torch.Tensor, source: TensorSource, shard: Optional[str] = None) -> None:
        if self.shards is not None:
            index = self.shards.index(shard)
            segments, local_start = [index], sum(self.seg_per_rank[:index])
        else:
            segments, local_start = range(len(self.segments)), 0
        source_width = sum(self.segments[i] for i in segments)
        check_shape(source, self._full_shape(param, source_width))
        if param is self.g_idx:  # indexes inputs, which column-parallel ranks all keep
            values = source.read()
            _check_g_idx(source, values, 0, self.group_size)
            _copy(param, values, source)
            return
        pack = PACK if param is self.qzeros else 1
        source_start = 0
        for i in segments:
            per_rank = self.seg_per_rank[i]
            begin = (source_start + self.tp.rank * per_rank) // pack
            cols = slice(begin, begin + per_rank // pack)
            piece = source.read((cols,) if param.dim() == 1 else (slice(None), cols))
            dest = param[..., local_start // pack:(local_start + per_rank) // pack]
            _copy(dest, piece, source)
            source_start += self.segments[i]
            local_start += per_rank

    def load_rows(self, param: torch.Tensor, source: TensorSource) -> None:
        check_shape(source, self._full_shape(param, self.out_features))
        # Rows per rank of each tensor: K/8 for qweight, K/G for qzeros and scales, K for g_idx.
        per_rank = param.shape[0]
        rows = slice(self.tp.rank * per_rank, (self.tp.rank + 1) * per_rank)
        piece = source.read((rows,))
        if param is self.g_idx:
            _check_g_idx(source, piece, rows.start, self.group_size)
        _copy(param, piece, source)

    def load_full_bias(self, param: torch.Tensor, source: TensorSource) -> None:
        check_shape(source, (self.out_features,))
        _copy(param, source.read(), source)

    def checkpoint_targets(self, prefix: str, **kwargs) -> Iterator[tuple[str, object, dict]]:
        """(name, parameter, loader keywords) of this layer's checkpoint tensors under `prefix`."""
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            yield f"{prefix}.{name}", getattr(self, name), kwargs
        yield f"{prefix}.bias", self.bias if self.bias is not None else self.zero_bias, kwargs

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size)
        if self.parallel == "row":
            y = self.tp.all_reduce(y)  # the bias is added once, after the reduction
        return y + self.bias if self.bias is not None else y


class GPTQColumnParallelLinear(GPTQLinear):
    def __init__(self, in_features, out_features, bias, group_size, tp, ops, dtype):
        super().__init__(in_features, [out_features], "column", bias, group_size, tp, ops, dtype)


class GPTQQKVParallelLinear(GPTQLinear):
    """Qwen's fused c_attn (with bias): thirds q, k, v, each split by heads across ranks."""

    def __init__(self, hidden_size, group_size, tp, ops, dtype):
        super().__init__(hidden_size, [hidden_size] * 3, "column", True, group_size, tp, ops, dtype)


class GPTQMergedGateUpLinear(GPTQLinear):
    """Qwen's w1 (up) and w2 (gate), no bias, as one matmul: local columns [w1 ; w2]."""

    def __init__(self, in_features, width, group_size, tp, ops, dtype):
        super().__init__(in_features, [width, width], "column", False, group_size, tp, ops, dtype,
                         shards=("w1", "w2"))


class GPTQRowParallelLinear(GPTQLinear):
    def __init__(self, in_features, out_features, bias, group_size, tp, ops, dtype):
        super().__init__(in_features, [out_features], "row", bias, group_size, tp, ops, dtype)


# ---------------------------------------------------------------------- packing
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same 32 bits as int32 (two's complement)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints in 0..15 -> [R/8, C] int32, value r in word r // 8 at bits 4*(r % 8)."""
    v = values.to(torch.int64).reshape(values.shape[0] // PACK, PACK, values.shape[1])
    shifts = torch.arange(0, 32, 4, dtype=torch.int64).view(1, PACK, 1)
    return _to_int32((v << shifts).sum(dim=1))


def pack_int4_cols(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints in 0..15 -> [R, C/8] int32, value c in word c // 8 at bits 4*(c % 8)."""
    return pack_int4_rows(values.t().contiguous()).t().contiguous()


def quantize_gptq(weight: torch.Tensor, group_size: int = 128) -> dict[str, torch.Tensor]:
    """A [N, K] float weight -> {qweight, qzeros, scales, g_idx} of symmetric 4-bit GPTQ.

    Per group of `group_size` inputs and per output: scale = 2 * max|w| / 15 (AutoGPTQ's
    symmetric range, rounded up to fp16 before use so dequantizing reproduces it), zero 8,
    q = clamp(round(w / scale) + 8, 0, 15). |dequant(q) - w| <= scale / 2.
    """
    n, k = weight.shape
    if k % group_size or group_size % PACK or n % PACK:
        raise ValueError(f"quantize_gptq: [{n}, {k}] weight does not pack with group size {group_size}")
    groups = k // group_size
    w = weight.float().t().reshape(groups, group_size, n)
    exact = (w.abs().amax(dim=1) * 2 / 15).clamp(min=1e-6)
    scales = exact.to(torch.float16)
    # Rounded up, never down, to fp16: the largest |w| stays within 7.5 steps of the zero,
    # so clamping to 0..15 never costs more than half a step.
    up = torch.nextafter(scales, torch.full_like(scales, torch.inf))
    scales = torch.where(scales.float() < exact, up, scales)
    q = torch.clamp(torch.round(w / scales.float().unsqueeze(1)) + 8, 0, 15).reshape(k, n)
    zeros = torch.full((groups, n), 8 - 1, dtype=torch.int64)  # AutoGPTQ stores zero - 1
    return {"qweight": pack_int4_rows(q), "qzeros": pack_int4_cols(zeros), "scales": scales,
            "g_idx": (torch.arange(k) // group_size).to(torch.int32)}
