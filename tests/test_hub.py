import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from csm import hub
from csm.errors import WeightsNotFoundError


def _hub_error(kind: type[Exception]) -> Exception:
    # The hub's HTTP errors want a live response object; the message is all we need here.
    error = kind.__new__(kind)
    Exception.__init__(error, "from the hub")
    return error


def test_a_file_is_its_own_source(tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    assert hub.resolve_file(file, ["model.safetensors"]) == file
    assert hub.is_local(file)


def test_a_folder_gives_the_first_candidate_it_has(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"b")
    (tmp_path / "c.bin").write_bytes(b"c")
    assert hub.resolve_file(tmp_path, ["a.bin", "sub/b.bin", "c.bin"]) == tmp_path / "sub" / "b.bin"
    assert hub.cached_file(tmp_path, ["a.bin", "c.bin"]) == tmp_path / "c.bin"
    assert hub.resolve_files(tmp_path, ["c.bin", "sub/b.bin"]) == [tmp_path / "c.bin", tmp_path / "sub" / "b.bin"]


def test_a_folder_without_the_file_names_what_it_looked_for(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="a.bin, b.bin"):
        hub.resolve_file(tmp_path, ["a.bin", "b.bin"])
    assert hub.cached_file(tmp_path, ["a.bin"]) is None


def test_neither_path_nor_repo_id(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="neither an existing file or folder nor a hub repo id"):
        hub.resolve_file(str(tmp_path / "missing" / "deeper" / "x"), ["a"])
    assert hub.cached_file("no-slash", ["a"]) is None


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (GatedRepoError, "accept its terms at https://huggingface.co/owner/name"),
        (RepositoryNotFoundError, "was not found, or it is private"),
    ],
)
def test_access_errors_say_what_to_do(monkeypatch, error, advice):
    def refuse(*args, **kwargs):
        raise _hub_error(error)

    monkeypatch.setattr(hub, "hf_hub_download", refuse)
    with pytest.raises(WeightsNotFoundError, match=advice):
        hub.resolve_file("owner/name", ["model.safetensors"])


def test_unreachable_hub_tries_the_other_candidates_in_the_cache_only(monkeypatch, tmp_path):
    calls = []

    def cache_has_only_the_second(repo_id, name, *, revision, local_files_only):
        calls.append((name, local_files_only))
        if name == "second.bin":
            return str(tmp_path / name)
        raise _hub_error(LocalEntryNotFoundError)

    monkeypatch.setattr(hub, "hf_hub_download", cache_has_only_the_second)
    assert hub.resolve_file("owner/name", ["first.bin", "second.bin"]) == tmp_path / "second.bin"
    assert calls == [("first.bin", False), ("second.bin", True)]


def test_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        hub.resolve_file("owner/name", ["model.safetensors"])
