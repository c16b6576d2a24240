"""A Hugging Face hub cache on disk, in the real huggingface_hub layout, for offline tests.

    populate_hub_cache(tmp_path, "sesame/csm-1b", {"model.safetensors": local_file})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

Layout: `models--owner--name/blobs/<sha256>`, `snapshots/<commit>/<file>` as relative symlinks
to the blobs, and `refs/<revision>` holding the commit hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def populate_hub_cache(
    cache_dir: Path, repo_id: str, files: dict[str, Path], *, revision: str = "main", commit: str = "0" * 40
) -> Path:
    """Put `files` (name in the repo -> local file) into the cache; returns the snapshot folder."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for name, source in files.items():
        blob = repo_dir / "blobs" / _sha256(Path(source))
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
