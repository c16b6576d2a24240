"""CSM checkpoints in any published layout: find the files, read them lazily, map keys, copy in.

Layouts:
- original (Sesame): `model.safetensors` or `ckpt.pt`, with a five-field `config.json`
  (optional: CSM-1B's configuration is the default);
- transformers (`CsmForConditionalGeneration`): `model.safetensors`, single or sharded with
  `model.safetensors.index.json`, and its `config.json`; q/k rows are stored permuted for
  rotate-half RoPE and are un-permuted (`csm.layouts`); the bundled codec (`codec_model.*`)
  is Mimi's.

The files are read lazily by `csm.weights`; the model is built on the meta device and every
tensor is read and copied into its final dtype and device one at a time, so loading needs
little more memory than the loaded model. `csm.loading` turns a checkpoint into a model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from csm import hub
from csm.adapters import load_adapter, merged
from csm.errors import CheckpointError, WeightsNotFoundError
from csm.layouts import detect_layout, from_transformers_layout
from csm.model import CSM, CSMConfig
from csm.quantize import FORMATS as QUANTIZED_FORMATS
from csm.quantize import INT4_GROUP_SIZE
from csm.transformers_config import config_from_transformers
from csm.weights import StoredTensor, check_keys_and_shapes, read_checkpoint, shard_finder

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "ckpt.pt")
CONFIG_FILE = "config.json"
# Stray buffers that some exports carry and no layout needs.
_IGNORED = re.compile(r".*_causal_mask$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's configuration and tensors (read lazily, in the original layout).

    `quantization` is None for plain weights, else the format of a folder that `csm quantize`
    wrote ("int8" or "int4"); its quantized linears are stored as `<name>.qweight`,
    `<name>.scales` (and `<name>.zeros`), the rest in bfloat16.
    """

    path: Path
    config: CSMConfig
    stored: dict[str, StoredTensor]
    quantization: str | None


def open_checkpoint(
    source: hub.Source = "sesame/csm-1b", *, revision: str | None = None, adapter: hub.Source | None = None
) -> Checkpoint:
    """Find a checkpoint, read its config and the names and shapes of its tensors.

    With `adapter`, the stored tensors read as the weights with the adapter merged in.
    """
    weights_path = hub.resolve_file(source, WEIGHT_FILES, revision=revision)
    stored = {
        name: tensor
        for name, tensor in read_checkpoint(weights_path, shard_finder(source, revision)).items()
        if not _IGNORED.match(name)
    }
    fields = _read_config(source, weights_path, revision)
    if fields.get("model_type") == "csm":
        config, quantization = config_from_transformers(fields), None
    else:
        config, quantization = CSMConfig.from_dict(fields), _quantization(fields, weights_path)
    if quantization is None and detect_layout(stored) == "transformers":
        stored = from_transformers_layout(stored, config)
    if adapter is not None:
        if quantization is not None:
            raise CheckpointError(
                f"{weights_path} is quantized ({quantization}): an adapter cannot be merged into quantized "
                "weights; merge it into the plain model with csm merge, then quantize the result"
            )
        stored = merged(stored, load_adapter(adapter, config), str(adapter))
    return Checkpoint(weights_path, config, stored, quantization)


def build_model(
    config: CSMConfig,
    stored: dict[str, StoredTensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    network: type[CSM] = CSM,
) -> CSM:
    """Allocate `network` (CSM or a subclass) in its final dtype and device, then copy the
    stored tensors in one by one."""
    with torch.device("meta"):
        model = network(config)
    check_keys_and_shapes(model.state_dict(), stored, "checkpoint does not fit the model config")
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_buffers()
    with torch.no_grad():
        for name, target in model.state_dict().items():
            target.copy_(stored[name].read())
    return model.eval().requires_grad_(False)


# --- configuration ---------------------------------------------------------------------------


def _read_config(source: hub.Source, weights_path: Path, revision: str | None) -> dict[str, Any]:
    """The fields of the config.json beside the weights, in either layout; {} (CSM-1B's) when there is none."""
    beside = weights_path.parent / CONFIG_FILE
    if beside.is_file():
        path = beside
    elif hub.is_local(source):
        return {}
    else:
        try:
            path = hub.resolve_file(source, [CONFIG_FILE], revision=revision)
        except WeightsNotFoundError:
            return {}
    try:
        fields = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path} does not hold a configuration object")
    return fields


def _quantization(fields: dict[str, Any], weights_path: Path) -> str | None:
    quantization = fields.get("quantization")
    if quantization is None:
        return None
    if not isinstance(quantization, dict) or quantization.get("format") not in QUANTIZED_FORMATS:
        raise CheckpointError(
            f"the config.json of {weights_path} names an unknown quantization {quantization!r} "
            f"(known formats: {', '.join(QUANTIZED_FORMATS)})"
        )
    if quantization["format"] == "int4" and quantization.get("group_size") != INT4_GROUP_SIZE:
        raise CheckpointError(
            f"the config.json of {weights_path} names int4 groups of {quantization.get('group_size')!r}; "
            f"this version of csm reads groups of {INT4_GROUP_SIZE}"
        )
    return quantization["format"]
