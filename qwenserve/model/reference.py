"""The no-cache reference path: whole sequences through the model with dense attention.

No KV cache, no scheduler: each call recomputes every token. Tests use it as the oracle that
the paged, batched, chunked engine must reproduce token for token.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from qwenserve.model.attention import AttentionMetadata, logn_scales
from qwenserve.model.config import QwenConfig
from qwenserve.model.qwen import NUM_REAL_TOKENS, QWenLMHeadModel


def dense_inputs(config: QwenConfig, sequences: Sequence[Sequence[int]],
                 ntk_alphas: Optional[Sequence[float]] = None, device: str = "cpu"):
    """Flat ids, positions and dense `AttentionMetadata` for whole sequences.

    `ntk_alphas` defaults to each sequence's own length (a prompt with nothing generated yet).
    """
    if ntk_alphas is None:
        ntk_alphas = [config.ntk_alpha(len(s)) for s in sequences]
    lens = [len(s) for s in sequences]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lens]).to(device)
    theta = torch.cat([torch.full((n,), config.rope_theta(a), dtype=torch.float32)
                       for n, a in zip(lens, ntk_alphas)]).to(device)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        max_query_len=max(lens), max_seq_len=max(lens), rope_theta=theta,
        logn_scale=logn_scales(positions, config.seq_length) if config.use_logn_attn else None,
        query_start_loc_list=starts, seq_lens_list=lens)
    return ids, positions, meta


@torch.inference_mode()
def reference_logits(model: QWenLMHeadModel, sequences: Sequence[Sequence[int]],
                     ntk_alphas: Optional[Sequence[float]] = None) -> list[torch.Tensor]:
    """Per sequence, [len, vocab] float32 logits of every position."""
    device = next(model.parameters()).device
    ids, positions, meta = dense_inputs(model.config, sequences, ntk_alphas, device=str(device))
    logits = model.compute_logits(model(ids, positions, meta))
    starts = meta.query_start_loc_list
    return [logits[starts[b]:starts[b + 1]] for b in range(len(sequences))]


def reference_greedy(model: QWenLMHeadModel, prompt: Sequence[int], max_tokens: int,
                     stop_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy decoding by full recomputation; NTK alpha fixed at the prompt length."""
    alpha = model.config.ntk_alpha(len(prompt))
    tokens, out = list(prompt), []
    device = next(model.parameters()).device
    for _ in range(max_tokens):
        ids, positions, meta = dense_inputs(model.config, [tokens], [alpha], device=str(device))
        with torch.inference_mode():
            last = model.compute_logits(model(ids, positions, meta)[-1:])[0, :NUM_REAL_TOKENS]
        token = int(torch.argmax(last))
        out.append(token)
        tokens.append(token)
        if token in stop_token_ids:
            break
    return out
