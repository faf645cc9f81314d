"""Where a `--model` / `LLM(model=...)` checkpoint lives: a local directory, or a Hugging Face
repo id resolved with huggingface_hub.

Owns that resolution and the name a model is served under. `resolve_model_dir`:

- an existing directory is used as it is;
- `org/name` that is not a local path is a Hub repo id: `snapshot_download` fetches the files
  qwenserve reads (config and generation config, safetensors, qwen.tiktoken) where there is a
  network and otherwise (or with HF_HUB_OFFLINE=1) returns the copy in the local cache
  (HF_HOME / HF_HUB_CACHE);
- anything else is an error saying the path does not exist.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional

BUILTIN_SERVED_NAME = "qwen-tiny"
# What qwenserve reads from a checkpoint; Qwen's .py files and any .bin weights are skipped.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.tiktoken"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(model: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return bool(_REPO_ID.match(model)) and not os.path.exists(model) and ".." not in model


def resolve_model_dir(model: str) -> str:
    """The local checkpoint directory for `model` (a directory or a Hub repo id); ValueError
    when it cannot be found."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"model: {model!r} is a file, not a checkpoint directory")
    if not is_repo_id(model):
        raise ValueError(f"model: {model!r} does not exist (give a checkpoint directory or a Hugging Face "
                         "repo id such as Qwen/Qwen-7B-Chat)")
    return _download(model)


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # a dependency; only a broken install lacks it
        raise ValueError(f"model: {repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is "
                         "not installed (pip install huggingface_hub)") from None
    print(f"qwenserve: resolving {repo_id} on the Hugging Face Hub (or its local cache) ...",
          file=sys.stderr, flush=True)
    try:
        return snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES)
    except LocalEntryNotFoundError:
        raise ValueError(f"model: {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
                         "reached (offline, or HF_HUB_OFFLINE=1); download it with network access first, "
                         "or give a checkpoint directory") from None
    except HfHubHTTPError as e:  # not found, gated, no access
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"model: {repo_id!r} could not be fetched from the Hugging Face Hub: {first_line}") from None
    except OSError as e:  # disk full, unwritable cache
        raise ValueError(f"model: {repo_id!r} could not be stored in the Hugging Face cache: {e}") from None


def served_model_name(model: Optional[str]) -> str:
    """The name clients use for `model` by default: a repo id as given, a directory's name,
    "qwen-tiny" for the built-in model."""
    if model is None:
        return BUILTIN_SERVED_NAME
    if is_repo_id(model):
        return model
    return os.path.basename(os.path.normpath(model)) or model
