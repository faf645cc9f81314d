"""The distribution the sampler draws from, computed the way the sampler did before its draw was
rewritten (qwenserve/worker/sampling_draw.py): the whole [n, V] row masked by top-k, then top-p
(over the renormalised survivors; ties with the last kept token kept), then min-p, and softmaxed.
The old sampler then drew from exactly these probabilities (an exponential race); the tests check
the new draw's frequencies against them. This is that code, unchanged but for the draw itself."""
from __future__ import annotations

import torch

MIN_TEMPERATURE = 1e-6
TOP_P_CANDIDATES = 1024


def apply_top_k(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Mask to -inf, per row of x [n, V], what lies below the k-th largest value
    (top_k[i] = 0: off). Like HF, every token tied with the k-th value is kept."""
    vocab = x.shape[1]
    k = [t if 0 < t < vocab else 0 for t in top_k]
    if not any(k):
        return x
    k_t = torch.tensor(k, dtype=torch.long, device=x.device).unsqueeze(1)
    kth = x.topk(max(k), dim=-1).values.gather(1, (k_t - 1).clamp(min=0))
    kth = kth.masked_fill(k_t == 0, float("-inf"))
    return x.masked_fill(x < kth, float("-inf"))


def apply_top_p(x: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Mask to -inf, per row of x [n, V], what lies outside the nucleus: the smallest set
    of most probable tokens whose mass reaches top_p[i] (1 = off), never empty. Tokens
    tied with the last one kept are kept too."""
    rows = [i for i, p in enumerate(top_p) if p < 1.0]
    if not rows:
        return x
    idx = torch.tensor(rows, dtype=torch.long, device=x.device)
    sub = x.index_select(0, idx)
    probs = sub.softmax(dim=-1)
    p = torch.tensor([top_p[i] for i in rows], dtype=probs.dtype, device=x.device).unsqueeze(1)
    vals = probs.topk(min(TOP_P_CANDIDATES, probs.shape[1]), dim=-1).values
    if vals.shape[1] < probs.shape[1] and bool((vals.sum(dim=-1, keepdim=True) < p).any()):
        vals = probs.sort(dim=-1, descending=True).values
    cum = vals.cumsum(dim=-1)
    mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
    num_kept = (mass_before < p).sum(dim=-1, keepdim=True)  # >= 1: mass_before[0] = 0
    last_kept = vals.gather(1, num_kept - 1)
    return x.index_copy(0, idx, sub.masked_fill(probs < last_kept, float("-inf")))


def reference_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """[n, V] probabilities of the old draw for processed logits [n, V] and SamplingParams [n]."""
    temperature = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params])
    x = logits / temperature.unsqueeze(1)
    x = apply_top_k(x, [p.top_k for p in params])
    x = apply_top_p(x, [p.top_p for p in params])
    probs = x.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params]).unsqueeze(1)
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
