"""Qwen's logn query scales as a device table: built once, read by position every step.

`logn_scales` (model/attention.py) is the formula, in float64; computing it on the host for every
token of every step (and copying the result over) is per-step work for a function of the position
alone. `LognTable` evaluates it once for positions 0 .. length-1 on the device and gathers each
step's scales by the positions tensor already there. A position past the table (max_model_len
raised at run time, or a caller that did not say) grows it to the next power of two.
"""
from __future__ import annotations

import torch

from qwenserve.model.attention import logn_scales

_MIN_LENGTH = 4096


class LognTable:
    def __init__(self, seq_length: int, device: torch.device, length: int = _MIN_LENGTH):
        self.seq_length, self.device = seq_length, device
        self.builds = 0  # how many times the table was evaluated (tests: once)
        self.table = self._build(max(length, 1))

    def _build(self, length: int) -> torch.Tensor:
        self.builds += 1
        positions = torch.arange(length, dtype=torch.int64)
        return logn_scales(positions, self.seq_length).to(self.device)

    def scales(self, positions: torch.Tensor, max_position: int) -> torch.Tensor:
        """[T] float32 scales of the [T] int64 `positions` (on the table's device);
        `max_position` is their largest value, known on the host."""
        if max_position >= self.table.shape[0]:
            self.table = self._build(1 << max_position.bit_length())
        return self.table.index_select(0, positions)
