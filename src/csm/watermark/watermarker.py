"""Embed and detect SilentCipher watermarks in audio at any sample rate.

The networks run at 44.1 kHz: other rates are resampled there and back with the
torchaudio-compatible resampler, exactly as CSM does for its 24 kHz output. Everything
runs in float32 on the chosen device (CPU, CUDA or MPS).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from csm import hub
from csm.devices import default_device
from csm.resample import resample
from csm.watermark import spectrum
from csm.watermark.checkpoint import (
    load_carrier_decoder,
    load_encoder,
    load_message_decoder,
)
from csm.watermark.message import (
    CSM_KEY,
    MESSAGE_SYMBOLS,
    check_key,
    consistency_score,
    key_symbols,
    one_hot_message,
    read_message,
    symbol_grid,
)
from csm.watermark.networks import CarrierDecoder, CarrierEncoder, MessageDecoder

MODEL_RATE = 44_100
WEIGHTS_FOLDER = "44_1_khz/73999_iteration"
# Every clip is scaled to this mean power (the training data's) before the networks see it.
REFERENCE_POWER = 0.002837200844477648
# The phase-shift search tries the clip cut by 0, 10, ..., 2040 samples: one STFT hop.
SHIFTS = tuple(range(0, spectrum.HOP, 10))
NOT_FOUND = "Could not find message"


class Watermarker:
    """SilentCipher-compatible watermarking (44.1 kHz model, 5-byte keys).

    Audio is a float tensor, 1-D (L,) or 2-D (channels, L). Each channel is marked and read
    on its own, as in the original: `encode` marks every channel with the same key,
    `decode` gives one result per channel (a list for 2-D input), and `verify` is true when
    any channel carries the key.
    """

    def __init__(
        self,
        encoder: CarrierEncoder,
        carrier_decoder: CarrierDecoder,
        load_message_decoder: Callable[[], MessageDecoder],
        *,
        device: torch.device | str | None = None,
        search_batch_frames: int | None = None,
    ) -> None:
        """`load_message_decoder` is called on the first decode, so that embedding alone
        never fetches its weights.

        The phase-shift search runs several shifts at once, up to `search_batch_frames`
        STFT frames in all (about 2 MB of activations per frame; fewer frames than one
        shifted clip has: one shift at a time). None: 1024 frames on
        accelerators, one shift at a time on the CPU, where batching gains nothing (4
        shifts of a 1 s clip take 12.2 s together, one takes 2.8 s) and costs memory.
        """
        self.device = torch.device(device) if device is not None else default_device()
        self.encoder = encoder.to(self.device)
        self.carrier_decoder = carrier_decoder.to(self.device)
        self._load_message_decoder = load_message_decoder
        self._message_decoder: MessageDecoder | None = None
        if search_batch_frames is None:
            search_batch_frames = 0 if self.device.type == "cpu" else 1024
        self.search_batch_frames = search_batch_frames

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike = "sony/silentcipher",
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        search_batch_frames: int | None = None,
    ) -> Watermarker:
        """The published weights from a hub repo, or a local copy of the repo or of its
        `44_1_khz/73999_iteration` folder. Only the files in use are fetched: the message
        decoder on the first decode."""
        if Path(source).expanduser().is_file():
            raise ValueError(f"{source} is a file: pass the silentcipher repo id or a folder with its checkpoints")

        def fetch(name: str) -> Path:
            return hub.resolve_file(source, [f"{WEIGHTS_FOLDER}/{name}", name], revision=revision)

        return cls(
            load_encoder(fetch("enc_c.ckpt")),
            load_carrier_decoder(fetch("dec_c.ckpt")),
            lambda: load_message_decoder(fetch("dec_m_0.ckpt")),
            device=device,
            search_batch_frames=search_batch_frames,
        )

    @property
    def message_decoder(self) -> MessageDecoder:
        if self._message_decoder is None:
            self._message_decoder = self._load_message_decoder().to(self.device)
        return self._message_decoder

    @torch.inference_mode()
    def encode(
        self, audio: torch.Tensor, sample_rate: int, key: Sequence[int] = CSM_KEY, message_sdr: float = 36.0
    ) -> torch.Tensor:
        """`audio` with `key` embedded, float32, same shape, rate and device.

        `message_sdr` is the watermark's level below the signal in dB (CSM uses 36; higher
        is fainter). Silent channels come back unchanged.
        """
        symbols = key_symbols(key)
        channels = _channels(audio, sample_rate)
        marked = torch.stack([self._encode_channel(channel, sample_rate, symbols, message_sdr) for channel in channels])
        return marked.reshape(audio.shape).to(audio.device)

    @torch.inference_mode()
    def decode(
        self,
        audio: torch.Tensor,
        sample_rate: int,
        phase_shift_decoding: bool = True,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> dict | list[dict]:
        """The original's result: `{"status": True, "messages": [bytes], "confidences": [c]}`,
        or `{"status": False, "messages": [], "confidences": [], "error": why}`.

        With `phase_shift_decoding` the clip is read at the cut (0, 10, ..., 2040 samples)
        whose guesses agree best across message repeats, so it need not start where the
        watermark does. Clips must be at least ~0.9 s long. `progress`, if given, is called
        with the number of cuts read after each network pass (at most `len(SHIFTS)` per
        channel: the search stops early at a perfect reading).
        """
        results = [
            self._decode_channel(channel, sample_rate, phase_shift_decoding, progress)
            for channel in _channels(audio, sample_rate)
        ]
        return results[0] if audio.ndim == 1 else results

    def verify(
        self,
        audio: torch.Tensor,
        sample_rate: int,
        key: Sequence[int] = CSM_KEY,
        *,
        thorough: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """True when (a channel of) `audio` carries `key`; `progress` as in `decode`.

        `thorough=False` reads the first cut only: one network pass, which finds the mark of
        a clip as it was written (marked clips start on the watermark's grid). False is then
        inconclusive: an edited or trimmed clip may carry the mark at another cut, which only
        the full search (up to 205 passes) finds.
        """
        expected = list(check_key(key))
        results = self.decode(audio, sample_rate, phase_shift_decoding=thorough, progress=progress)
        return any(result["status"] and result["messages"][0] == expected for result in _as_list(results))

    def _encode_channel(
        self, audio: torch.Tensor, sample_rate: int, symbols: list[int], message_sdr: float
    ) -> torch.Tensor:
        clip = resample(audio.to(self.device), sample_rate, MODEL_RATE)
        power = clip.pow(2).mean()
        if power.item() == 0:
            return audio.to(self.device)
        scaled = clip * (REFERENCE_POWER / power) ** 0.5
        spec = spectrum.spectrogram(scaled[None])
        magnitude, phase = spectrum.magnitude(spec)[:, None], spectrum.phase(spec)
        del spec
        message = one_hot_message(symbols, magnitude.shape[-1], self.device)
        features = torch.cat(
            [self.encoder(magnitude), magnitude, self.encoder.spread_message(message, magnitude.shape[2])], dim=1
        )
        watermark = self.carrier_decoder(features, message_sdr)
        del features
        # The watermark's level follows the whole clip's spectral level.
        watermark *= magnitude.pow(2).mean() ** 0.5
        marked = (magnitude - watermark).relu_()[:, 0]
        restored = spectrum.inverse(marked, phase, clip.shape[-1])[0] * (power / REFERENCE_POWER) ** 0.5
        # Resampling back may give one sample more than the input had (lengths not a
        # multiple of 80 at 24 kHz); those first samples equal the reference's.
        return resample(restored, MODEL_RATE, sample_rate)[: audio.shape[-1]]

    def _decode_channel(
        self,
        audio: torch.Tensor,
        sample_rate: int,
        phase_shift_decoding: bool,
        progress: Callable[[int], None] | None,
    ) -> dict:
        clip = resample(audio.to(self.device), sample_rate, MODEL_RATE)
        shifts = SHIFTS if phase_shift_decoding else SHIFTS[:1]
        shortest = clip.shape[-1] - shifts[-1]
        if shortest <= 0 or spectrum.frame_count(shortest) < MESSAGE_SYMBOLS:
            return _not_found(
                f"audio too short to decode: {clip.shape[-1] / MODEL_RATE:.2f} s, it needs at least "
                f"{_minimum_length(shifts[-1]) / MODEL_RATE:.2f} s"
            )
        power = clip.pow(2).mean()
        if power.item() == 0:
            return _not_found(NOT_FOUND)
        grid = self._best_grid(clip * (REFERENCE_POWER / power) ** 0.5, shifts, progress)
        decoded = read_message(grid)
        if decoded is None:
            return _not_found(NOT_FOUND)
        return {"messages": [decoded.message], "confidences": [decoded.confidence], "status": True}

    def _best_grid(
        self, clip: torch.Tensor, shifts: Sequence[int], progress: Callable[[int], None] | None
    ) -> np.ndarray:
        """The symbol grid of the first shift with the highest consistency score.

        No shift can beat a perfect score, so the search stops at the first one.
        """
        best_score, best_grid = -1.0, None
        for batch in self._shift_batches(clip.shape[-1], shifts):
            magnitude = spectrum.magnitude(spectrum.shifted_spectrograms(clip, batch))[:, None]
            guesses = self.message_decoder(magnitude).argmax(dim=1).cpu().numpy()
            if progress is not None:
                progress(len(batch))
            for row in guesses:
                grid = symbol_grid(row)
                score = consistency_score(grid)
                if score > best_score:
                    best_score, best_grid = score, grid
                if best_score == 1.0:
                    return best_grid
        return best_grid

    def _shift_batches(self, length: int, shifts: Sequence[int]) -> Iterator[list[int]]:
        """Consecutive shifts in groups of equal frame count, at most `search_batch_frames`
        frames per group; the first shift alone, as a marked clip usually stops there."""
        yield [shifts[0]]
        batch: list[int] = []
        for shift in shifts[1:]:
            frames = spectrum.frame_count(length - shift)
            fits = max(1, self.search_batch_frames // frames)
            if batch and (spectrum.frame_count(length - batch[0]) != frames or len(batch) == fits):
                yield batch
                batch = []
            batch.append(shift)
        if batch:
            yield batch


def _channels(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """`audio` as float32 (channels, L), checked."""
    if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
        raise ValueError(f"audio must be a floating point torch.Tensor, got {getattr(audio, 'dtype', type(audio))}")
    if audio.ndim not in (1, 2) or audio.shape[-1] == 0:
        raise ValueError(f"audio must be (samples,) or (channels, samples) and not empty, got {tuple(audio.shape)}")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if not torch.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    return audio.float().reshape(-1, audio.shape[-1])


def _minimum_length(last_shift: int) -> int:
    """Fewest samples at 44.1 kHz that still give one full message row at `last_shift`."""
    return last_shift + (MESSAGE_SYMBOLS - 3) // 2 * spectrum.N_FFT


def _not_found(why: str) -> dict:
    return {"messages": [], "confidences": [], "error": why, "status": False}


def _as_list(results: dict | list[dict]) -> list[dict]:
    return results if isinstance(results, list) else [results]
