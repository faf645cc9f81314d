"""Shared fixtures: the tiny random-weight checkpoint every engine test runs on."""
import os
import tempfile

import pytest

# The built-in model is created once per test run in a private cache, never in the user's.
os.environ.setdefault("QWENSERVE_CACHE", tempfile.mkdtemp(prefix="qwenserve-test-cache-"))


@pytest.fixture(scope="session")
def tiny_checkpoint() -> str:
    """The built-in tiny model (2 layers, 4 heads x 32, real vocabulary), sharded with an index."""
    from qwenserve.model.checkpoint import builtin_model_dir

    return builtin_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded in float32 on the CPU with the torch reference kernels."""
    import torch

    from qwenserve.kernels import get_ops
    from qwenserve.model.config import QwenConfig
    from qwenserve.model.loader import load_weights
    from qwenserve.model.qwen import QWenLMHeadModel

    model = QWenLMHeadModel(QwenConfig.from_dir(tiny_checkpoint), get_ops(False), torch.float32)
    load_weights(model, tiny_checkpoint)
    return model.eval()


@pytest.fixture
def largest_reads(monkeypatch) -> dict:
    """Per checkpoint tensor, the most elements any one read returned during the test: how
    tensor-parallel tests check that a rank reads only its slice."""
    from qwenserve.model import loader

    sizes: dict[str, int] = {}
    original = loader.SafetensorsSource.read

    def recording_read(self, index=()):
        out = original(self, index)
        sizes[self.name] = max(sizes.get(self.name, 0), out.numel())
        return out

    monkeypatch.setattr(loader.SafetensorsSource, "read", recording_read)
    return sizes
