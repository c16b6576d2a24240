"""Find artifact files: in a local file or folder, or in a Hugging Face hub repo (cached).

Every loader in csm resolves its files here, so all of them accept the same kinds of
source, honour the hub cache and `HF_HUB_OFFLINE`, and fail with the same clear advice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from csm.errors import WeightsNotFoundError

Source = str | os.PathLike


def is_local(source: Source) -> bool:
    """True when `source` names an existing file or folder rather than a hub repo."""
    return Path(source).expanduser().exists()


def resolve_file(source: Source, candidates: Sequence[str], *, revision: str | None = None) -> Path:
    """The first of `candidates` that `source` provides.

    `source` is a file (returned as is), a folder (candidates are paths relative to it) or a
    hub repo id (candidates are downloaded into, or read from, the standard cache).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in candidates:
            if (path / name).is_file():
                return path / name
        raise WeightsNotFoundError(f"{path} has none of: {', '.join(candidates)}")
    return _download_first(str(source), candidates, revision)


def resolve_files(source: Source, filenames: Sequence[str], *, revision: str | None = None) -> list[Path]:
    """Every one of `filenames` from the folder or hub repo `source`."""
    return [resolve_file(source, [name], revision=revision) for name in filenames]


def cached_file(source: Source, candidates: Sequence[str], *, revision: str | None = None) -> Path | None:
    """Where the first available candidate lies on disk now, without any network access."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return next((path / name for name in candidates if (path / name).is_file()), None)
    if not _looks_like_repo_id(str(source)):
        return None
    for name in candidates:
        found = try_to_load_from_cache(str(source), name, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _download_first(repo_id: str, candidates: Sequence[str], revision: str | None) -> Path:
    if not _looks_like_repo_id(repo_id):
        raise WeightsNotFoundError(f"{repo_id!r} is neither an existing file or folder nor a hub repo id (owner/name)")
    not_cached = []
    for name in candidates:
        try:
            # Once the hub proved unreachable, try the other candidates in the cache only,
            # rather than waiting through the network retries again.
            local_only = bool(not_cached)
            return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=local_only))
        except GatedRepoError:
            raise WeightsNotFoundError(_gated_advice(repo_id)) from None
        except RevisionNotFoundError:
            raise WeightsNotFoundError(f"hub repo {repo_id} has no revision {revision!r}") from None
        except RepositoryNotFoundError:
            raise WeightsNotFoundError(
                f"hub repo {repo_id} was not found, or it is private and you are not logged in; "
                f"check the name, log in (`huggingface-cli login` or HF_TOKEN), or pass a local path"
            ) from None
        except LocalEntryNotFoundError:
            not_cached.append(name)
        except EntryNotFoundError:
            continue
    if not_cached:
        raise WeightsNotFoundError(_offline_advice(repo_id, not_cached))
    raise WeightsNotFoundError(f"hub repo {repo_id} has none of: {', '.join(candidates)}")


def _gated_advice(repo_id: str) -> str:
    return (
        f"hub repo {repo_id} is gated: accept its terms at https://huggingface.co/{repo_id}, "
        f"then log in with `huggingface-cli login` or set HF_TOKEN; or pass a local path"
    )


def _offline_advice(repo_id: str, names: Sequence[str]) -> str:
    why = (
        "HF_HUB_OFFLINE is set"
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        else "the hub could not be reached"
    )
    return (
        f"{', '.join(names)} from hub repo {repo_id} {'is' if len(names) == 1 else 'are'} not in the local cache "
        f"and {why}; "
        f"connect once to download it (if the repo is gated, accept its terms at "
        f"https://huggingface.co/{repo_id} and log in or set HF_TOKEN), or pass a local path; "
        f"once files are cached, HF_HUB_OFFLINE=1 skips the network"
    )
