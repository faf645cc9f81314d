"""Random weights made directly on the device: a full-depth 7B for the decode and prefill
benchmarks without writing 15 GB of safetensors to disk first."""
from __future__ import annotations

import json
import os
import tempfile

def random_weights_dir(preset: str, layers, int4: bool = False) -> str:
    """A checkpoint directory with config, generation config and tokenizer but no weights;
    `int4`: the GPTQ Int4 layout of the Qwen-*-Int4 checkpoints (fp16 activations)."""
    import shutil

    from qwenserve.model.checkpoint import GENERATION_CONFIG, GPTQ_CONFIG, preset_config
    from qwenserve.model.tokenizer import QwenTokenizer
    out = tempfile.mkdtemp(prefix=f"qwenserve-random-{preset}-")
    raw = preset_config(preset, layers)
    if int4:
        raw.update(bf16=False, fp16=True, quantization_config=dict(GPTQ_CONFIG))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
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
            if not p.dtype.is_floating_point:  # GPTQ packed words: every nibble random
                p.random_(0, 2 ** 31)
            elif name.endswith("scales"):  # GPTQ [K/128, N]: random levels -8..7 have std ~4.6
                std = (p.shape[0] * 128) ** -0.5 * ((2 * layers) ** -0.5 if "c_proj" in name else 1.0)
                p.uniform_(0.8, 1.2).mul_(std / 4.6)
            elif p.dim() == 1:  # norm weights near 1, biases small
                p.normal_(1.0, 0.1) if "ln" in name else p.normal_(0.0, 0.1)
            elif name.startswith("wte"):
                p.normal_(0.0, 1.0)
            else:
                std = p.shape[1] ** -0.5
                std *= 3.0 if name.startswith("lm_head") else (2 * layers) ** -0.5 if "c_proj" in name else 1.0
                p.normal_(0.0, std)
    worker_module.load_weights = random_init
