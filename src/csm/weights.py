"""Read checkpoint files lazily, whatever model they hold: every loader in csm reads through here.

A checkpoint is a safetensors file, a sharded safetensors index (`*.safetensors.index.json`)
or a torch `ckpt.pt`. Reading one gives each tensor's shape at once and its data only when
asked for, so a loader can check names and shapes first and then copy tensor by tensor into
the final dtype and device, needing little more memory than the loaded model.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from csm import hub
from csm.errors import CheckpointError

FindShard = Callable[[str], Path]


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a checkpoint file, read only when asked for."""

    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def read_checkpoint(path: Path, find_shard: FindShard | None = None, *, prefix: str = "") -> dict[str, StoredTensor]:
    """The tensors whose names start with `prefix` in a safetensors file, a sharded index or a torch `ckpt.pt`.

    Shards of an index are looked for beside it, else through `find_shard` when given; shards
    that hold no wanted tensor are never opened.
    """
    if path.suffix == ".json":
        tensors = _read_sharded(path, find_shard, prefix)
    elif zipfile.is_zipfile(path):
        tensors = _read_torch(path)
    else:
        tensors = _read_safetensors(path)
    return {name: tensor for name, tensor in tensors.items() if name.startswith(prefix)}


def shard_finder(source: hub.Source, revision: str | None) -> FindShard | None:
    """Where the shards of an index in `source` come from: the same hub repo, else only beside the index."""
    if hub.is_local(source):
        return None
    return lambda name: hub.resolve_file(source, [name], revision=revision)


def check_keys_and_shapes(
    expected: Mapping[str, torch.Tensor | StoredTensor], found: Mapping[str, torch.Tensor | StoredTensor], what: str
) -> None:
    """Raise a CheckpointError that starts with `what` and names the missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{name} {tuple(found[name].shape)} (expected {tuple(expected[name].shape)})"
        for name in sorted(set(expected) & set(found))
        if tuple(found[name].shape) != tuple(expected[name].shape)
    ]
    problems = [
        f"{kind} keys: {some_names(names)}"
        for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if names
    ]
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def some_names(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path) -> dict[str, StoredTensor]:
    # Plain reads rather than a memory map: a mapped file's pages would count toward this
    # process's memory until the whole model is loaded.
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise CheckpointError(
                f"{path} is not a checkpoint: it is not a readable safetensors file, nor a torch zip archive"
            )
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} has a malformed entry for {name!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: the size of {name!r} does not match its shape and dtype")
        if data_start + end > size:
            raise CheckpointError(f"{path} is truncated: {name!r} lies beyond its end; download it again")
        tensors[name] = StoredTensor(shape, _reader(path, data_start + begin, dtype, shape))
    return tensors


def _reader(path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        raw = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8)
        with path.open("rb") as file:
            file.seek(offset)
            file.readinto(memoryview(raw.numpy()))
        return raw.view(dtype).view(shape)

    return read


def _read_sharded(index_path: Path, find_shard: FindShard | None, prefix: str) -> dict[str, StoredTensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_path} is not a safetensors index (no weight_map)") from None
    wanted = {name: shard for name, shard in weight_map.items() if name.startswith(prefix)}
    tensors = {}
    for shard in sorted(set(wanted.values())):
        beside = index_path.parent / shard
        if not beside.is_file() and find_shard is None:
            raise CheckpointError(f"{index_path} lists the shard {shard}, which is not beside it")
        shard_tensors = _read_safetensors(beside if beside.is_file() else find_shard(shard))
        tensors.update({name: tensor for name, tensor in shard_tensors.items() if wanted.get(name) == shard})
    return tensors


def _read_torch(path: Path) -> dict[str, StoredTensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several unrelated types for unusable files
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path} does not hold a plain state dict of tensors")
    return {name: StoredTensor(tuple(value.shape), lambda value=value: value) for name, value in state.items()}
