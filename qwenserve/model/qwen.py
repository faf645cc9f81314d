"""`QWenLMHeadModel`: Qwen (v1) over the flat-batch attention interface, tensor-parallel aware.

Qwen-1 specifics kept exact: fused `c_attn` with bias (q, k, v thirds), MLP
`c_proj(w1(x) * silu(w2(x)))` of width `intermediate_size // 2`, RMSNorm with
`layer_norm_epsilon`, rotary over the whole head with a per-request base (dynamic NTK), and
the logn query scale past `seq_length` (both supplied per token by `AttentionMetadata`).
With `config.quantization` (GPTQ Int4 checkpoints) the five linears of each block are the
GPTQ layers of `quant.py`; embedding, norms and LM head stay dense.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import nn

from qwenserve.model.attention import Attention, AttentionMetadata
from qwenserve.model.config import QwenConfig
from qwenserve.model.layers import (MergedGateUpLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                                    RowParallelLinear, VocabParallelEmbedding)
from qwenserve.model.parallel import TensorParallelGroup, divide, get_tp_group
from qwenserve.model.quant import GPTQMergedGateUpLinear, GPTQQKVParallelLinear, GPTQRowParallelLinear

# Vocabulary rows above the last real token are padding and are never sampled.
NUM_REAL_TOKENS = 151851


class QWenAttention(nn.Module):
    def __init__(self, config: QwenConfig, tp: TensorParallelGroup, ops, dtype: torch.dtype):
        super().__init__()
        self.num_heads = divide(config.num_attention_heads, tp.size, "the number of attention heads")
        self.head_dim = config.head_dim
        self.ops = ops
        h, quant = config.hidden_size, config.quantization
        if quant is None:
            self.c_attn = QKVParallelLinear(h, tp, dtype)
            self.c_proj = RowParallelLinear(h, h, not config.no_bias, tp, dtype)
        else:
            self.c_attn = GPTQQKVParallelLinear(h, quant.group_size, tp, ops, dtype)
            self.c_proj = GPTQRowParallelLinear(h, h, not config.no_bias, quant.group_size, tp, ops, dtype)
        self.attn = Attention(self.num_heads, self.head_dim, 1.0 / math.sqrt(self.head_dim), ops)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        width = self.num_heads * self.head_dim
        qkv = self.c_attn(hidden)
        q, k, v = (t.view(num_tokens, self.num_heads, self.head_dim) for t in qkv.split(width, dim=-1))
        self.ops.apply_rotary(q, k, positions, meta.rope_theta)
        out = self.attn(q, k, v, meta)
        return self.c_proj(out.reshape(num_tokens, width))


class QWenMLP(nn.Module):
    def __init__(self, config: QwenConfig, tp: TensorParallelGroup, ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        h, width, quant = config.hidden_size, config.mlp_width, config.quantization
        if quant is None:
            self.gate_up = MergedGateUpLinear(h, width, tp, dtype)
            self.c_proj = RowParallelLinear(width, h, not config.no_bias, tp, dtype)
        else:
            self.gate_up = GPTQMergedGateUpLinear(h, width, quant.group_size, tp, ops, dtype)
            self.c_proj = GPTQRowParallelLinear(width, h, not config.no_bias, quant.group_size, tp, ops, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.ops.swiglu(self.gate_up(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: QwenConfig, tp: TensorParallelGroup, ops, dtype: torch.dtype):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = RMSNorm(config.hidden_size, eps, ops, dtype)
        self.attn = QWenAttention(config, tp, ops, dtype)
        self.ln_2 = RMSNorm(config.hidden_size, eps, ops, dtype)
        self.mlp = QWenMLP(config, tp, ops, dtype)

    def forward(self, hidden, residual, positions, meta):
        # The residual stream is carried separately so each norm can fuse the add.
        if residual is None:
            residual, hidden = hidden, self.ln_1(hidden)
        else:
            hidden, residual = self.ln_1(hidden, residual)
        hidden = self.attn(hidden, positions, meta)
        hidden, residual = self.ln_2(hidden, residual)
        return self.mlp(hidden), residual


class QWenLMHeadModel(nn.Module):
    def __init__(self, config: QwenConfig, ops, dtype: torch.dtype = torch.float32,
                 tp: Optional[TensorParallelGroup] = None):
        super().__init__()
        tp = tp or get_tp_group()
        if config.quantization is not None and config.quantization.desc_act:
            raise ValueError("GPTQ checkpoints with desc_act (act-order) are not supported")
        self.config, self.tp, self.dtype = config, tp, dtype
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, dtype)
        self.h = nn.ModuleList(QWenBlock(config, tp, ops, dtype) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, ops, dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[T] ids and positions -> [T, hidden] final hidden states (after ln_f)."""
        hidden, residual = self.wte(input_ids), None
        for block in self.h:
            hidden, residual = block(hidden, residual, positions, meta)
        hidden, _ = self.ln_f(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """[S, hidden] -> [S, vocab] float32 logits on rank 0 (None on other ranks)."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    def attention_layers(self) -> list[Attention]:
        return [block.attn.attn for block in self.h]

    def checkpoint_targets(self) -> Iterator[tuple[str, nn.Parameter, dict]]:
        """(checkpoint tensor name, parameter, loader keywords) for every tensor a checkpoint holds."""
        yield "transformer.wte.weight", self.wte.weight, {}
        for i, block in enumerate(self.h):
            p = f"transformer.h.{i}."
            yield p + "ln_1.weight", block.ln_1.weight, {}
            yield p + "ln_2.weight", block.ln_2.weight, {}
            if self.config.quantization is not None:
                yield from block.attn.c_attn.checkpoint_targets(p + "attn.c_attn")
                yield from block.attn.c_proj.checkpoint_targets(p + "attn.c_proj")
                yield from block.mlp.gate_up.checkpoint_targets(p + "mlp.w1", shard="w1")
                yield from block.mlp.gate_up.checkpoint_targets(p + "mlp.w2", shard="w2")
                yield from block.mlp.c_proj.checkpoint_targets(p + "mlp.c_proj")
                continue
            yield p + "attn.c_attn.weight", block.attn.c_attn.weight, {}
            yield p + "attn.c_attn.bias", block.attn.c_attn.bias, {}
            if block.attn.c_proj.bias is not None:
                yield p + "attn.c_proj.bias", block.attn.c_proj.bias, {}
            yield p + "attn.c_proj.weight", block.attn.c_proj.weight, {}
            yield p + "mlp.w1.weight", block.mlp.gate_up.weight, {"shard": "w1"}
            yield p + "mlp.w2.weight", block.mlp.gate_up.weight, {"shard": "w2"}
            yield p + "mlp.c_proj.weight", block.mlp.c_proj.weight, {}
            if block.mlp.c_proj.bias is not None:
                yield p + "mlp.c_proj.bias", block.mlp.c_proj.bias, {}
        yield "transformer.ln_f.weight", self.ln_f.weight, {}
        yield "lm_head.weight", self.lm_head.weight, {}
