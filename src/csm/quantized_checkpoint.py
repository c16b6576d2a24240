"""Quantized checkpoints: what `csm quantize` writes and `csm.loading.load_for_generation` reads.

A folder with `model.safetensors` and `config.json`. The config is the original five fields
plus `"quantization": {"format": "int8" | "int4", "group_size": ...}`. Every linear that
quantization covers (`csm.inference.quantized_linear_names`, published names) is stored in
the portable form of `csm.quantize.QuantizedWeight` as `<name>.qweight`, `<name>.scales`
and, for int4, `<name>.zeros`; every other tensor in bfloat16 under its published name. The
kernels' own layouts depend on the CPU, so they are built at load time, one layer at a time.
An int8 folder runs in either int8 mode (`csm.quantize.MODES`): both use the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy
import torch
from safetensors.torch import save_file
from torch import nn

from csm import hub
from csm.checkpoints import CONFIG_FILE, Checkpoint
from csm.errors import CheckpointError, WeightsNotFoundError
from csm.inference import arrange_audio_head, prepare, quantized_linear_names
from csm.model import CSM
from csm.quantize import INT4_GROUP_SIZE, QuantizedWeight, quantize, stored_format
from csm.weights import check_keys_and_shapes

WEIGHTS_FILE = "model.safetensors"
_STORED_DTYPES = {"int8": torch.int8, "int4": torch.uint8}
# Files of a model repo that a quantized folder keeps, so that it can stand in for the repo.
_COMPANIONS = ("tokenizer.json", "prompts/conversational_a.wav", "prompts/conversational_b.wav")


def save_quantized(
    model: CSM, folder: Path, format: str, *, source: hub.Source | None = None, revision: str | None = None
) -> Path:
    """Write the plain (published-layout) `model` quantized to `format` into `folder`.

    `format` may also name a mode (`csm.quantize.MODES`): the folder holds its stored format.

    With `source`, the model repo or folder it came from, its tokenizer and voice prompts are
    copied too, when it has them.
    """
    folder = Path(folder)
    format = stored_format(format)
    folder.mkdir(parents=True, exist_ok=True)
    linears = set(quantized_linear_names(model))
    tensors = {}
    for name, tensor in model.state_dict().items():
        linear = name.removesuffix(".weight")
        if linear in linears:
            for suffix, part in quantize(tensor, format).tensors().items():
                tensors[f"{linear}.{suffix}"] = part.contiguous().cpu()
        else:
            tensors[name] = tensor.to("cpu", torch.bfloat16).contiguous()
    save_file(tensors, folder / WEIGHTS_FILE)
    group_size = INT4_GROUP_SIZE if format == "int4" else None
    config = {**model.config.to_dict(), "quantization": {"format": format, "group_size": group_size}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if source is not None:
        _copy_companions(source, revision, folder)
    return folder


def _copy_companions(source: hub.Source, revision: str | None, folder: Path) -> None:
    base = Path(source).expanduser()
    base = base.parent if base.is_file() else source
    for name in _COMPANIONS:
        try:
            found = hub.resolve_file(base, [name], revision=revision)
        except WeightsNotFoundError:
            continue
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, folder / name)


def build_quantized_model(
    checkpoint: Checkpoint, *, device: torch.device, mode: str | None = None, network: type[CSM] = CSM
) -> CSM:
    """The prepared (fused, quantized) `network` (CSM or a subclass) of a quantized checkpoint,
    built layer by layer.

    `mode` (`csm.quantize.MODES`) must run the checkpoint's format; by default it is that format.
    """
    format = checkpoint.quantization
    mode = mode or format
    if stored_format(mode) != format:
        raise ValueError(f"{checkpoint.path} holds {format} weights, which mode {mode} cannot run")
    stored = checkpoint.stored
    with torch.device("meta"):
        model = network(checkpoint.config).to(torch.bfloat16)
    linears = quantized_linear_names(model)
    expected = _expected_shapes(model, linears, format)
    check_keys_and_shapes(expected, stored, f"{checkpoint.path} does not fit its {format} config")

    def read(name: str) -> torch.Tensor:
        tensor = stored[name].read()
        wanted = _STORED_DTYPES[format] if name.endswith(".qweight") else torch.bfloat16
        if tensor.dtype != wanted:
            raise CheckpointError(f"{checkpoint.path}: {name} is {tensor.dtype}, expected {wanted} for {format}")
        return tensor.to(device)

    def quantized(name: str) -> QuantizedWeight:
        zeros = read(f"{name}.zeros") if format == "int4" else None
        return QuantizedWeight(format, read(f"{name}.qweight"), read(f"{name}.scales"), zeros)

    with torch.no_grad():
        prepare(model, mode, quantized=quantized)
        if device.type == "cpu":
            _map_embeddings(model, checkpoint.path)
        _materialize(model, read, device)
        arrange_audio_head(model)
    return model.eval().requires_grad_(False)


def _map_embeddings(model: CSM, path: Path) -> None:
    """Leave the embedding tables in the file, mapped: a step gathers a few rows of them, so only
    the rows in use become resident (the text table alone is 0.5 GB, half an int4 model).

    The mapping is private (copy-on-write): nothing ever writes to the file.
    """
    with path.open("rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_len))
    for module in (model.text_embeddings, model.audio_embeddings):
        name = next(name for name, candidate in model.named_modules() if candidate is module) + ".weight"
        if header[name]["dtype"] != "BF16":
            raise CheckpointError(f"{path}: {name} is {header[name]['dtype']}, expected BF16")
        begin, end = header[name]["data_offsets"]
        mapped = numpy.memmap(path, dtype=numpy.uint8, mode="c", offset=8 + header_len + begin, shape=(end - begin,))
        table = torch.from_numpy(mapped).view(torch.bfloat16).view(module.weight.shape)
        module.weight = nn.Parameter(table, requires_grad=False)


def _expected_shapes(model: CSM, linears: list[str], format: str) -> dict[str, torch.Size]:
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    for linear in linears:
        rows, columns = shapes.pop(f"{linear}.weight")
        if format == "int8":
            shapes.update({f"{linear}.qweight": (rows, columns), f"{linear}.scales": (rows,)})
        else:
            groups = (rows, columns // INT4_GROUP_SIZE)
            shapes.update(
                {f"{linear}.qweight": (rows, columns // 2), f"{linear}.scales": groups, f"{linear}.zeros": groups}
            )
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def _materialize(model: CSM, read, device: torch.device) -> None:
    """Read the tensors still on the meta device (all but the quantized linears) into place."""
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.is_meta:
                full_name = f"{module_name}.{name}" if module_name else name
                setattr(module, name, nn.Parameter(read(full_name), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    model.init_buffers()
