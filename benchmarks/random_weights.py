"""Random weights made directly on the device: a full-depth 7B for the decode and prefill
benchmarks without writing 15 GB of safetensors to disk first."""
from __future__ import annotations

import json
import os
import tempfile

def random_weights_dir(preset: str, layers) -> str:
    """A checkpoint directory with config, generation config and tokenizer but no weights."""
    import shutil

    from qwenserve.model.checkpoint import GENERATION_CONFIG, preset_config
    from qwenserve.model.tokenizer import QwenTokenizer
    out = tempfile.mkdtemp(prefix=f"qwenserve-random-{preset}-")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(preset_config(preset, layers), f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
    shutil.copyfile(QwenTokenizer.from_dir(None).path, os.path.join(out, "qwen.tiktoken"))
    return out


def use_random_weights(seed: int) -> None:
    """Makes the in-process worker fill its parameters randomly on the device instead of reading
    safetensors: a 32-layer 7B model without writing 15 GB to disk. Scales as the checkpoint maker."""
    import torch

    import qwenserve.worker.worker as worker_module

    def random_init(model, path, progress=None):
        torch.manual_seed(seed)
        layers = sum(1 for n, _ in model.named_parameters() if n.endswith("ln_1.weight"))
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights near 1, biases small
                p.normal_(1.0, 0.1) if "ln" in name else p.normal_(0.0, 0.1)
            elif name.startswith("wte"):
                p.normal_(0.0, 1.0)
            else:
                std = p.shape[1] ** -0.5
                std *= 3.0 if name.startswith("lm_head") else (2 * layers) ** -0.5 if "c_proj" in name else 1.0
                p.normal_(0.0, std)
    worker_module.load_weights = random_init
