"""A Hugging Face hub cache laid out by hand, for tests of `--model ORG/NAME` offline."""
import os
from pathlib import Path


def lay_out_hf_cache(root: Path, repo_id: str, checkpoint: str) -> Path:
    """A Hugging Face hub cache holding `checkpoint` as `repo_id` at revision main, as
    huggingface_hub writes it (refs/main -> a commit, snapshots/<commit>/<files>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(checkpoint):
        (snapshot / name).symlink_to(os.path.join(checkpoint, name))
    return snapshot
