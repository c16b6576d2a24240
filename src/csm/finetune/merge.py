"""Fold an adapter into a model and write a full checkpoint, in the original or transformers layout.

The transformers layout is what `CsmForConditionalGeneration.from_pretrained` reads: its
tensor names, q/k rows permuted for rotate-half RoPE, a CsmConfig `config.json`, and the
Mimi codec as `codec_model.*`, taken from the model source when it has one, else from the
`kyutai/mimi` layout source `codec`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from csm import hub
from csm.checkpoints import WEIGHT_FILES
from csm.layouts import CODEC_PREFIX, to_transformers_layout
from csm.loading import load_csm
from csm.transformers_config import transformers_config
from csm.weights import read_checkpoint, shard_finder

LAYOUTS = ("original", "transformers")


def merge(
    model: hub.Source, adapter: hub.Source, output: Path, *, layout: str = "original", codec: hub.Source = "kyutai/mimi"
) -> Path:
    """Write `model` with `adapter` merged into `output` (a folder); returns the weights file."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    merged = load_csm(model, adapter=adapter)
    output.mkdir(parents=True, exist_ok=True)
    if layout == "original":
        save_file(
            {name: tensor.contiguous() for name, tensor in merged.state_dict().items()},
            str(output / "model.safetensors"),
        )
        (output / "config.json").write_text(json.dumps(merged.config.to_dict()))
    else:
        tensors = to_transformers_layout(merged.state_dict(), merged.config)
        tensors.update(_codec_tensors(model, codec))
        save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
        (output / "config.json").write_text(
            json.dumps(transformers_config(merged.config, _codec_config(model, codec)), indent=2)
        )
    return output / "model.safetensors"


def _model_stored(model: hub.Source):
    path = hub.resolve_file(model, WEIGHT_FILES)
    return path, read_checkpoint(path, shard_finder(model, None), prefix=CODEC_PREFIX)


def _codec_tensors(model: hub.Source, codec: hub.Source) -> dict[str, torch.Tensor]:
    _, bundled = _model_stored(model)
    if bundled:
        return {name: tensor.read() for name, tensor in bundled.items()}
    path = hub.resolve_file(codec, ["model.safetensors"])
    return {f"{CODEC_PREFIX}{name}": tensor.read() for name, tensor in read_checkpoint(path).items()}


def _codec_config(model: hub.Source, codec: hub.Source) -> dict:
    path, bundled = _model_stored(model)
    if bundled:
        config_path = path.parent / "config.json"
        return json.loads(config_path.read_text())["codec_config"]
    return json.loads(hub.resolve_file(codec, ["config.json"]).read_text())
