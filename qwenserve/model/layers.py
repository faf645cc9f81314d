"""Tensor-parallel building blocks of the Qwen model, each parameter with its `weight_loader`.

A weight loader takes the parameter and a `TensorSource` (a lazily readable checkpoint
tensor), checks the full, unsharded shape, and reads only this rank's slice:

    column-parallel  weight [out, in]   rank r reads rows    r*out/tp .. (r+1)*out/tp
    row-parallel     weight [out, in]   rank r reads columns r*in/tp  .. (r+1)*in/tp
    fused c_attn     weight [3h, in]    q, k, v thirds first, then each third by heads
    merged w1 | w2   two tensors        local rows [w1 shard ; w2 shard]  (up, then gate)
    vocab-parallel   weight [V, h]      rank r reads rows r*V/tp .. (r+1)*V/tp
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qwenserve.model.parallel import TensorParallelGroup, divide


class TensorSource(Protocol):
    name: str
    shape: tuple[int, ...]

    def read(self, index: tuple = ()) -> torch.Tensor: ...


class InMemorySource:
    """A `TensorSource` over a tensor already in memory (tests, conversions)."""

    def __init__(self, name: str, tensor: torch.Tensor):
        self.name, self.tensor, self.shape = name, tensor, tuple(tensor.shape)

    def read(self, index: tuple = ()) -> torch.Tensor:
        return self.tensor[index] if index else self.tensor


def check_shape(source: TensorSource, expected: tuple[int, ...]) -> None:
    if tuple(source.shape) != tuple(expected):
        raise ValueError(f"tensor {source.name}: checkpoint shape {list(source.shape)} does not "
                         f"match the model's expected shape {list(expected)}")


def copy_into(param: torch.Tensor, data: torch.Tensor) -> None:
    param.data.copy_(data.to(dtype=param.dtype))


def _row_slice(rank: int, rows: int) -> slice:
    return slice(rank * rows, (rank + 1) * rows)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup,
                 dtype: torch.dtype):
        super().__init__()
        self.tp, self.in_features, self.out_features = tp, in_features, out_features
        self.out_per_rank = divide(out_features, tp.size, "the output width of a column-parallel linear")
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.load_rows
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.load_rows
        else:
            self.bias = None

    def load_rows(self, param: torch.Tensor, source: TensorSource) -> None:
        check_shape(source, (self.out_features,) + tuple(param.shape[1:]))
        copy_into(param, source.read((_row_slice(self.tp.rank, self.out_per_rank),)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Qwen's fused c_attn: thirds q, k, v, each split by heads across ranks."""

    def __init__(self, hidden_size: int, tp: TensorParallelGroup, dtype: torch.dtype):
        self.hidden_size = hidden_size
        super().__init__(hidden_size, 3 * hidden_size, True, tp, dtype)

    def load_rows(self, param: torch.Tensor, source: TensorSource) -> None:
        check_shape(source, (self.out_features,) + tuple(param.shape[1:]))
        per_rank = self.hidden_size // self.tp.size
        for third in range(3):
            start = third * self.hidden_size + self.tp.rank * per_rank
            piece = source.read((slice(start, start + per_rank),))
            copy_into(param[third * per_rank:(third + 1) * per_rank], piece)


class MergedGateUpLinear(ColumnParallelLinear):
    """Qwen's w1 (up) and w2 (gate) as one matmul: local rows [w1 shard ; w2 shard]."""

    SHARDS = ("w1", "w2")

    def __init__(self, in_features: int, width: int, tp: TensorParallelGroup, dtype: torch.dtype):
        self.width = width
        super().__init__(in_features, 2 * width, False, tp, dtype)

    def load_rows(self, param: torch.Tensor, source: TensorSource, shard: str = "w1") -> None:
        check_shape(source, (self.width, self.in_features))
        per_rank = self.width // self.tp.size
        offset = self.SHARDS.index(shard) * per_rank
        copy_into(param[offset:offset + per_rank], source.read((_row_slice(self.tp.rank, per_rank),)))


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) + b with W's input columns split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup,
                 dtype: torch.dtype):
        super().__init__()
        self.tp, self.in_features, self.out_features = tp, in_features, out_features
        self.in_per_rank = divide(in_features, tp.size, "the input width of a row-parallel linear")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.load_columns
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.load_bias
        else:
            self.bias = None

    def load_columns(self, param: torch.Tensor, source: TensorSource) -> None:
        check_shape(source, (self.out_features, self.in_features))
        copy_into(param, source.read((slice(None), _row_slice(self.tp.rank, self.in_per_rank))))

    def load_bias(self, param: torch.Tensor, source: TensorSource) -> None:
        check_shape(source, (self.out_features,))
        copy_into(param, source.read())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        # The bias is added once, after the reduction, not once per rank.
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks; each rank embeds the ids it owns, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup, dtype: torch.dtype):
        super().__init__()
        self.tp, self.vocab_size, self.hidden_size = tp, vocab_size, hidden_size
        self.rows_per_rank = divide(vocab_size, tp.size, "the vocabulary size")
        self.vocab_start = tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.load_rows

    def load_rows(self, param: torch.Tensor, source: TensorSource) -> None:
        check_shape(source, (self.vocab_size, self.hidden_size))
        copy_into(param, source.read((_row_slice(self.tp.rank, self.rows_per_rank),)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """LM head with vocab rows split across ranks; full logits are assembled on rank 0 only."""

    def forward(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        return self.tp.gather_last_dim_to_rank0(F.linear(hidden, self.weight))


class RMSNorm(nn.Module):
    """Qwen's RMSNorm; the math lives in the kernels (`rms_norm`, `add_rms_norm`)."""

    def __init__(self, hidden_size: int, eps: float, ops, dtype: torch.dtype):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param: torch.Tensor, source: TensorSource) -> None:
        check_shape(source, tuple(param.shape))
        copy_into(param, source.read())

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
