"""Read the published SilentCipher checkpoints into our networks.

Each published `.ckpt` is a `torch.save`d state dict from a DataParallel model: every key
starts with `module.`, layers are `main.N.{conv,gate,bn}`, and the message decoder
interleaves parameter-free dropouts, so its gated layers sit at the odd indices of `main`.
"""

from __future__ import annotations

import os
import re

import torch

from csm.errors import CheckpointError
from csm.watermark.networks import (
    ENCODER_CHANNELS,
    CarrierDecoder,
    CarrierEncoder,
    MessageDecoder,
)

# BatchNorm running averages: the original never uses them (see GatedLayer).
_UNUSED = re.compile(r"\.bn\.(running_mean|running_var|num_batches_tracked)$")
_LAYER = re.compile(r"^main\.(\d+)\.(conv|gate|bn)\.(weight|bias)$")


def load_encoder(path: str | os.PathLike) -> CarrierEncoder:
    """The carrier encoder from `enc_c.ckpt`."""
    return _load(CarrierEncoder(), _internal_keys(path, layer_of=lambda index: index, linear="message"), path)


def load_carrier_decoder(path: str | os.PathLike) -> CarrierDecoder:
    """The carrier decoder from `dec_c.ckpt`, its repeated inputs folded into the first layer."""
    state = _internal_keys(path, layer_of=lambda index: index, linear=None)
    for kind in ("conv", "gate"):
        name = f"layers.0.{kind}.weight"
        state[name] = _fold_repeated_inputs(state.get(name), path)
    return _load(CarrierDecoder(), state, path)


def load_message_decoder(path: str | os.PathLike) -> MessageDecoder:
    """The message decoder from `dec_m_0.ckpt`."""
    return _load(MessageDecoder(), _internal_keys(path, layer_of=_message_layer, linear="readout"), path)


def _message_layer(index: int) -> int:
    if index % 2 == 0:
        raise ValueError(f"main.{index} is a dropout and has no parameters")
    return index // 2


def _internal_keys(path, layer_of, linear: str | None) -> dict[str, torch.Tensor]:
    state = _read(path)
    mapped = {}
    for key, tensor in state.items():
        name = key.removeprefix("module.")
        if _UNUSED.search(name):
            continue
        layer = _LAYER.match(name)
        try:
            if layer:
                index, kind, field = layer.groups()
                kind = "norm" if kind == "bn" else kind
                name = f"layers.{layer_of(int(index))}.{kind}.{field}"
            elif linear and name.startswith("linear."):
                name = f"{linear}.{name.removeprefix('linear.')}"
        except ValueError as error:
            raise CheckpointError(f"{path}: unexpected key {key}: {error}") from None
        mapped[name] = tensor
    return mapped


def _fold_repeated_inputs(weight: torch.Tensor | None, path) -> torch.Tensor:
    """(96, 32 + 32 + 32, k, k) -> (96, 32 + 1 + 1, k, k): the magnitude and the message
    image each enter 32 times, so their 32 kernels act as one summed kernel."""
    expected = (ENCODER_CHANNELS * 3,)
    if weight is None or weight.ndim != 4 or tuple(weight.shape[1:2]) != expected:
        shape = None if weight is None else tuple(weight.shape)
        raise CheckpointError(f"{path}: first carrier decoder layer has shape {shape}, expected (96, 96, 3, 3)")
    features, magnitude, message = weight.split(ENCODER_CHANNELS, dim=1)
    return torch.cat([features, magnitude.sum(1, keepdim=True), message.sum(1, keepdim=True)], dim=1)


def _read(path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def _load(network: torch.nn.Module, state: dict[str, torch.Tensor], path) -> torch.nn.Module:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(name for name in set(state) & set(expected) if state[name].shape != expected[name].shape)
    if missing or unexpected or misshaped:
        problems = [
            f"{label}: {', '.join(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
            if names
        ]
        raise CheckpointError(f"{path} does not fit {type(network).__name__} ({'; '.join(problems)})")
    network.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return network.eval().requires_grad_(False)
