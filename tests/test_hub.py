"""`--model` / `LLM(model=...)` resolution (qwenserve/model/hub.py): directories as they are, a
Hugging Face repo id from a cache the test lays out under HF_HUB_OFFLINE=1 (huggingface_hub reads
its settings at import, so each case runs in a fresh interpreter), and clear errors otherwise."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenserve.model.hub import is_repo_id, resolve_model_dir, served_model_name
from hf_cache import lay_out_hf_cache

REPO = Path(__file__).resolve().parents[1]


def resolve_offline(cache: Path, model: str) -> subprocess.CompletedProcess:
    script = "import sys; from qwenserve.model.hub import resolve_model_dir; print(resolve_model_dir(sys.argv[1]))"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", script, model], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_repo_id_resolves_to_its_snapshot_in_the_offline_cache(tmp_path, tiny_checkpoint):
    snapshot = lay_out_hf_cache(tmp_path / "hub", "qwenserve-test/qwen-tiny", tiny_checkpoint)
    out = resolve_offline(tmp_path / "hub", "qwenserve-test/qwen-tiny")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(snapshot)
    assert (Path(out.stdout.strip()) / "config.json").is_file()


def test_a_repo_id_missing_from_the_offline_cache_says_so(tmp_path):
    (tmp_path / "hub").mkdir()
    out = resolve_offline(tmp_path / "hub", "Qwen/Qwen-7B-Chat")
    assert out.returncode == 1
    assert "model: 'Qwen/Qwen-7B-Chat' is not in the local Hugging Face cache and the Hub cannot be reached" \
        in out.stderr


def test_directories_files_and_missing_paths(tmp_path, tiny_checkpoint):
    assert resolve_model_dir(tiny_checkpoint) == tiny_checkpoint
    with pytest.raises(ValueError, match=r"model: '/nonexistent/qwen' does not exist"):
        resolve_model_dir("/nonexistent/qwen")
    with pytest.raises(ValueError, match=r"model: 'qwen-7b' does not exist"):
        resolve_model_dir("qwen-7b")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file, not a checkpoint directory"):
        resolve_model_dir(str(tmp_path / "weights.bin"))


def test_repo_ids_and_served_names(tmp_path, monkeypatch):
    assert is_repo_id("Qwen/Qwen-7B-Chat") and is_repo_id("org/name.v1")
    assert not is_repo_id("/abs/path") and not is_repo_id("./rel/path") and not is_repo_id("a/b/c")
    assert not is_repo_id("../x")
    local = tmp_path / "org" / "model"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_repo_id("org/model")  # a local directory of that name wins
    assert served_model_name(None) == "qwen-tiny"
    assert served_model_name("Qwen/Qwen-7B-Chat") == "Qwen/Qwen-7B-Chat"
    assert served_model_name("/models/Qwen-14B-Chat/") == "Qwen-14B-Chat"
