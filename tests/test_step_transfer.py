"""worker/step_transfer.py: a step's inputs packed into one buffer and moved in one copy, every
view aligned and holding its array; a host buffer reused only after its copy is done."""
import numpy as np
import torch

from qwenserve.worker.step_transfer import ALIGN_BYTES, StepInputBuffer, copy_to_host_async


def _parts(rng, sizes):
    kinds = [np.int64, np.int32, np.float32]
    return [rng.integers(-1000, 1000, size=n).astype(kinds[i % 3]) for i, n in enumerate(sizes)]


def test_every_part_is_an_aligned_view_with_its_values():
    rng = np.random.default_rng(0)
    buffer = StepInputBuffer(torch.device("cpu"))
    for sizes in ([3, 1, 7, 0, 5], [1], [100, 33, 2, 9], [0, 0, 4]):
        parts = _parts(rng, sizes)
        tensors = buffer.transfer(parts)
        base = tensors[0].untyped_storage().data_ptr()
        for part, tensor in zip(parts, tensors):
            assert tensor.data_ptr() % ALIGN_BYTES == 0
            assert tensor.untyped_storage().data_ptr() == base  # one buffer: one copy on a GPU
            assert tensor.dtype == {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                                    np.dtype(np.float32): torch.float32}[part.dtype]
            assert tensor.numpy().tolist() == part.tolist()


def test_two_host_buffers_in_turn_each_reused_after_its_copy():
    """Step k+1 packs into the other buffer (step k's views stay intact meanwhile); step k+2
    reuses step k's after waiting on the event recorded behind its copy."""
    class Event:
        def __init__(self, log, name):
            self.log, self.name = log, name

        def synchronize(self):
            self.log.append(self.name)

    waited, recorded = [], []
    buffer = StepInputBuffer(torch.device("cpu"))
    first = buffer.transfer([np.arange(4, dtype=np.int64)])[0]
    second = buffer.transfer([np.arange(10, 14, dtype=np.int64)])[0]
    assert first.tolist() == [0, 1, 2, 3] and second.tolist() == [10, 11, 12, 13]
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    buffer._copied = [Event(waited, "buffer 0"), Event(waited, "buffer 1")]  # as CUDA would record
    third = buffer.transfer([np.arange(20, 24, dtype=np.int64)])[0]
    assert waited == ["buffer 0"] and third.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert second.tolist() == [10, 11, 12, 13]


def test_a_cpu_tensor_needs_no_host_copy():
    assert copy_to_host_async(torch.arange(3)) is None
