"""Moving a step's data between host and device without stalling the host.

Owns three things the model runner needs every step:

- `StepInputBuffer`: the step's input arrays (ids, positions, slots, block tables, ...) packed
  into one host buffer and moved with ONE non-blocking copy into one persistent device buffer;
  every input tensor is a typed view of it. On CUDA the host side is pinned memory, two buffers
  used in turn, each reused only once the copy out of it has finished (an event), so packing
  step k+1 never overwrites what step k's copy is still reading. On the CPU the views are of
  the host buffer itself (no copy).

      host (pinned) [ ids | positions | slots | rows ... | starts | seq_lens | table | thetas ]
                      each part on a 16-byte boundary ──one copy_(non_blocking)──► device buffer

  Every view starts on a 16-byte boundary: Triton compiles a kernel per pointer alignment, so
  the alignment must not change from step to step.
- `DeviceEvents`: events on the device's one stream; the host waits on them only where it
  must read results (a step's sampled ids).
- `copy_to_host_async(tensor)`: a pinned copy of a device tensor, filled by the stream; read it
  after the event recorded behind it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

ALIGN_BYTES = 16
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                 np.dtype(np.float32): torch.float32}


class DeviceEvents:
    """Events on the device's (one) stream: `record()` marks the work queued so far; the
    returned object's `synchronize()` waits for it. Nothing to wait for on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def record(self) -> Optional[object]:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event


def copy_to_host_async(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """A pinned host copy of a CUDA tensor, queued on the stream (read it after an event
    recorded behind this call); None for a CPU tensor, which is already readable."""
    if tensor.device.type != "cuda":
        return None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class StepInputBuffer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._hosts: list[Optional[torch.Tensor]] = [None, None]
        self._copied: list[Optional[object]] = [None, None]  # the event after each host's last copy
        self._turn = 0
        self._device_buffer: Optional[torch.Tensor] = None
        self._events = DeviceEvents(device)

    def transfer(self, parts: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The 1-D arrays `parts` (int64, int32 or float32) as tensors on the device, in order."""
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += -(-part.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        total = max(total, ALIGN_BYTES)
        turn = self._turn
        self._turn ^= 1
        if self._copied[turn] is not None:  # long done in practice: it was two steps ago
            self._copied[turn].synchronize()
        host = self._hosts[turn]
        if host is None or host.numel() < total:
            host = self._hosts[turn] = torch.empty(2 * total, dtype=torch.uint8, pin_memory=self.cuda)
        host_bytes = host.numpy()
        for offset, part in zip(offsets, parts):
            host_bytes[offset:offset + part.nbytes] = np.ascontiguousarray(part).view(np.uint8)
        if self.cuda:
            if self._device_buffer is None or self._device_buffer.numel() < total:
                self._device_buffer = torch.empty(2 * total, dtype=torch.uint8, device=self.device)
            # Stream-ordered after the previous step's kernels, which read the same device
            # buffer, so one device buffer is enough.
            self._device_buffer[:total].copy_(host[:total], non_blocking=True)
            self._copied[turn] = self._events.record()
            source = self._device_buffer
        else:
            source = host
        return [source[offset:offset + part.nbytes].view(_TORCH_DTYPES[part.dtype])
                for offset, part in zip(offsets, parts)]
