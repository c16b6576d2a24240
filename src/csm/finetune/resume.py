"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and position in the data.

Written to a temporary folder and renamed, so an interrupted save never leaves a broken one.
The new one is renamed in before the old one is deleted: the old one is first moved aside
(`.NAME.old`), and a crash before the new one is in place leaves it there, where the next
save or load puts it back. Everything is read back with `weights_only=True`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from csm.errors import CheckpointError

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
# Options that shape the data order, the trained weights or the loss: a resumed run must keep them.
MUST_MATCH = (
    "data",
    "model",
    "full",
    "lora_rank",
    "lora_alpha",
    "targets",
    "epochs",
    "steps",
    "batch_frames",
    "grad_accum",
    "warmup",
    "decoder_frame_ratio",
    "seed",
    "eval_split",
)


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next step's epoch and step within it."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    selection: torch.Tensor,
    position: Position,
    options: dict,
) -> None:
    trainable = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    _recover(folder)
    temporary = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(trainable, str(temporary / WEIGHTS))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "selection_rng": selection,
            "position": [position.step, position.epoch, position.epoch_step],
            "options": options,
        },
        temporary / STATE,
    )
    old = _old(folder)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    temporary.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _old(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def _recover(folder: Path) -> None:
    """Puts back a checkpoint that a save moved aside and then crashed before renaming the new one in."""
    if not folder.exists() and _old(folder).is_dir():
        _old(folder).rename(folder)


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer, scheduler, options: dict
) -> tuple[torch.Tensor, Position]:
    """Restore a checkpoint into a model set up like the saved one; returns (selection RNG state, position)."""
    _recover(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / STATE).is_file():
        raise CheckpointError(f"{folder} is not a csm fine-tuning checkpoint (no {WEIGHTS} and {STATE})")
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    changed = [name for name in MUST_MATCH if state["options"].get(name) != options.get(name)]
    if changed:
        raise CheckpointError(
            f"checkpoint {folder} was made with other settings of {', '.join(changed)}: "
            f"resume with the options of the run that saved it"
        )
    trainable = load_file(str(folder / WEIGHTS))
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(parameters):
        raise CheckpointError(
            f"checkpoint {folder} was made with other training settings (LoRA rank, targets or --full): "
            f"its trainable weights do not match this run's"
        )
    with torch.no_grad():
        for name, tensor in trainable.items():
            parameters[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["selection_rng"], Position(*state["position"])
