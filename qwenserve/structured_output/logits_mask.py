"""Applying a token bitmask to logits, in place, on the logits' device.

This module owns the one operation between a bitmask and the logits:
`logits[b, t] = -inf` where bit t of row b is 0, and for every column t >= 32 * MASK_WORDS
(the embedding's padding rows, which no mask row describes). Whole-tensor operations only;
no loop over rows or the vocabulary.

    bitmask [B, W] int32 ──view──► [B, 4W] uint8 ──bits──► allowed [B, 32W] ──► masked_fill
    (bit k of int32 word w = token 32w + k; little-endian bytes, so byte j holds 8j..8j+7)
"""
from __future__ import annotations

import numpy as np
import torch

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _bit_shifts(device: torch.device) -> torch.Tensor:
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return shifts


def allowed_matrix(bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """bool [B, 32 * W] on `device`: True where the host bitmask allows the token."""
    if device.type == "cpu":
        # numpy's unpackbits is one C loop; torch's shift-and-mask is three passes here.
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    return unpack_bits_torch(bitmask.to(device, non_blocking=True))


def unpack_bits_torch(bitmask: torch.Tensor) -> torch.Tensor:
    """`allowed_matrix` with torch operations only, on the bitmask's own device (the GPU path)."""
    data = bitmask.view(torch.uint8)
    bits = (data.unsqueeze(-1) >> _bit_shifts(data.device)) & 1
    return bits.view(data.shape[0], -1).bool()


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Masks `logits` [B, V] (any float dtype and device) in place with `bitmask` [B, W]
    int32 on the host; returns `logits`."""
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask must be int32 [B={logits.shape[0]}, W], got "
                         f"{bitmask.dtype} {tuple(bitmask.shape)}")
    allowed = allowed_matrix(bitmask, logits.device)
    width = min(logits.shape[1], allowed.shape[1])
    logits[:, :width].masked_fill_(~allowed[:, :width], float("-inf"))
    if logits.shape[1] > width:
        logits[:, width:] = float("-inf")
    return logits
