"""The safetensors loader: single file or sharded with an index, read lazily one tensor at a time.

Each parameter's own `weight_loader` reads only its slice through a safetensors slice
handle, so a tensor-parallel rank never materialises another rank's part of a tensor.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some Qwen exports carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsSource:
    """A lazily read checkpoint tensor: `read(index)` loads only the indexed slice."""

    def __init__(self, name: str, handle):
        self.name = name
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def read(self, index: tuple = ()) -> torch.Tensor:
        if not index:
            return self._slice[:]
        return self._slice[index]


def checkpoint_files(path: str) -> dict[str, list[str]]:
    """Maps each safetensors file of a checkpoint directory to the tensor names it should hold."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: bad index ({type(e).__name__}: {e}); expected a JSON "
                             f"object with a 'weight_map' of tensor name -> file") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: bad index: 'weight_map' is empty or not an object")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not os.path.isfile(os.path.join(path, file)):
                raise ValueError(f"{index_path}: bad index: shard {file!r} listed for "
                                 f"{files[file][0]!r} does not exist")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as handle:
            return {SINGLE_FILE: list(handle.keys())}
    raise FileNotFoundError(f"{path!r} holds no {SINGLE_FILE} and no {INDEX_FILE}")


def load_weights(model: torch.nn.Module, path: str,
                 progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Loads every tensor the model's `checkpoint_targets()` names from the checkpoint at `path`."""
    targets: dict[str, list[tuple]] = {}
    for name, param, kwargs in model.checkpoint_targets():
        targets.setdefault(name, []).append((param, kwargs))
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)

    files = checkpoint_files(path)
    total = sum(len(names) for names in files.values())
    loaded: set[str] = set()
    done = 0
    for file, names in sorted(files.items()):
        with safe_open(os.path.join(path, file), framework="pt") as handle:
            present = set(handle.keys())
            for name in names:
                done += 1
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in present:
                    raise ValueError(f"{file}: tensor {name} is listed in the index but not in the file")
                if name not in targets:
                    raise ValueError(f"unexpected tensor {name} in {file}: the model has no such parameter")
                source = SafetensorsSource(name, handle)
                for param, kwargs in targets[name]:
                    param.weight_loader(param, source, **kwargs)
                    if tie and name == "transformer.wte.weight" and "lm_head.weight" in targets:
                        for head, head_kwargs in targets["lm_head.weight"]:
                            head.weight_loader(head, source, **head_kwargs)
                        loaded.add("lm_head.weight")
                loaded.add(name)
                if progress:
                    progress(done, total)
    missing = sorted(name for name in set(targets) - loaded
                     if not all(getattr(param, "optional", False) for param, _ in targets[name]))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {path!r} is missing tensor(s): {', '.join(missing[:5])}{more}")
