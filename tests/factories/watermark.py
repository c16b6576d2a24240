"""Random SilentCipher weights in the exact layout of the hub repo `sony/silentcipher`.

`write_silentcipher_repo(root)` creates `root/44_1_khz/73999_iteration/` with
`hparams.yaml`, `enc_c.ckpt`, `dec_c.ckpt` and `dec_m_0.ckpt`: `torch.save`d state dicts
whose keys start with `module.`, as the published files. Pass `root` (or the iteration
folder) to `csm.watermark.Watermarker.from_pretrained`, or the iteration folder to the
original package's `get_model`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

ITERATION_FOLDER = "44_1_khz/73999_iteration"

# The fields of the published hparams.yaml that the original package reads.
HPARAMS = """\
SR: 44100
N_FFT: 4096
HOP_LENGTH: 2048
message_dim: 5
message_len: 21
message_band_size: 1024
message_sdr: 47
n_messages: 1
model_type: 44.1k
enc_n_layers: 3
dec_c_n_layers: 4
ensure_negative_message: true
ensure_constrained_message: false
no_normalization: false
frame_level_normalization: false
utterance_level_normalization: true
"""


def write_silentcipher_repo(root: str | Path, seed: int = 0) -> Path:
    """Write random weights under `root` in the hub layout; returns the iteration folder."""
    generator = torch.Generator().manual_seed(seed)
    folder = Path(root) / ITERATION_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hparams.yaml").write_text(HPARAMS)
    networks = {
        # (layer index in `main`, in channels, out channels, kernel size) per gated layer
        "enc_c": [(0, 1, 32, 3), (1, 32, 32, 3), (2, 32, 32, 3)],
        "dec_c": [(0, 96, 96, 3), (1, 96, 96, 3), (2, 96, 96, 3), (3, 96, 1, 1)],
        # the message decoder's gated layers sit between parameter-free dropouts
        "dec_m_0": [(1, 1, 128, 3), *((2 * i + 1, 128, 128, 3) for i in range(1, 9)), (19, 128, 5, 3)],
    }
    linears = {"enc_c": (5, 1024), "dec_m_0": (1024, 1)}
    for name, layers in networks.items():
        state = {}
        for index, dim_in, dim_out, kernel in layers:
            state.update(_gated_layer(f"module.main.{index}", dim_in, dim_out, kernel, generator))
        if name in linears:
            dim_in, dim_out = linears[name]
            state["module.linear.weight"] = _uniform((dim_out, dim_in), dim_in, generator)
            state["module.linear.bias"] = _uniform((dim_out,), dim_in, generator)
        torch.save(state, folder / f"{name}.ckpt")
    return folder


def _gated_layer(prefix: str, dim_in: int, dim_out: int, kernel: int, generator) -> dict[str, torch.Tensor]:
    fan_in = dim_in * kernel * kernel
    state = {}
    for conv in ("conv", "gate"):
        state[f"{prefix}.{conv}.weight"] = _uniform((dim_out, dim_in, kernel, kernel), fan_in, generator)
        state[f"{prefix}.{conv}.bias"] = _uniform((dim_out,), fan_in, generator)
    state[f"{prefix}.bn.weight"] = 1 + 0.1 * torch.randn(dim_out, generator=generator)
    state[f"{prefix}.bn.bias"] = 0.1 * torch.randn(dim_out, generator=generator)
    # Running averages that the original never uses; random so that using them shows.
    state[f"{prefix}.bn.running_mean"] = torch.randn(dim_out, generator=generator)
    state[f"{prefix}.bn.running_var"] = torch.rand(dim_out, generator=generator) + 0.5
    state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(74_000)
    return state


def _uniform(shape: tuple[int, ...], fan_in: int, generator) -> torch.Tensor:
    # torch's default initialisation for convolutions and linear layers
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class PerfectMessageDecoder(torch.nn.Module):
    """A stand-in for the message decoder that reads `key`, perfectly repeated, from any
    clip: `watermarker._message_decoder = PerfectMessageDecoder()` makes `verify` true
    for `key` after one cheap pass. `calls` counts the passes."""

    def __init__(self, key=(212, 211, 146, 56, 201)) -> None:
        super().__init__()
        bits = "".join(f"{byte:08b}" for byte in key)
        self.symbols = [int(bits[i : i + 2], 2) + 1 for i in range(0, 40, 2)] + [0]
        self.calls = 0

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        frames = magnitude.shape[-1]
        symbols = torch.tensor(self.symbols * frames, device=magnitude.device)[:frames]
        logits = torch.nn.functional.one_hot(symbols, 5).T.float()
        return logits.expand(magnitude.shape[0], 5, frames)


class ReadoutMessageDecoder(torch.nn.Module):
    """A cheap stand-in for the message decoder: a fixed random readout of the log message
    band, so that a whole 205-shift search takes about a second. `calls` counts passes."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.weight = torch.randn(5, 1024, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        band = (magnitude[:, 0, :1024] + 1e-3).log()
        return torch.einsum("sf,bft->bst", self.weight.to(band.device), band)
