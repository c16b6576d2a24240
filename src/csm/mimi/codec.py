"""Mimi: 24 kHz mono audio <-> codes of up to 32 codebooks at 12.5 Hz.

encode: SEANet encoder -> transformer -> downsample (25 -> 12.5 Hz) -> split RVQ.
decode: RVQ lookup -> upsample (12.5 -> 25 Hz) -> transformer -> SEANet decoder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from csm.mimi.config import MimiConfig
from csm.mimi.conv import CausalConv1d, CausalConvTranspose1d, ConvState
from csm.mimi.loading import load_weights
from csm.mimi.quantizer import SplitResidualQuantizer
from csm.mimi.seanet import SEANetDecoder, SEANetEncoder, SEANetState
from csm.mimi.transformer import Transformer, TransformerState

DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"


class Mimi(nn.Module):
    """The Mimi codec. `num_codebooks` (1..32) is how many codebooks `encode` returns."""

    def __init__(self, config: MimiConfig | None = None, num_codebooks: int | None = None):
        super().__init__()
        config = MimiConfig() if config is None else config
        num_codebooks = config.num_codebooks if num_codebooks is None else num_codebooks
        if not 1 <= num_codebooks <= config.num_codebooks:
            raise ValueError(f"num_codebooks must be in 1..{config.num_codebooks}, got {num_codebooks}")
        self.config = config
        self.num_codebooks = num_codebooks
        self.encoder = SEANetEncoder(config)
        self.encoder_transformer = Transformer(config)
        self.downsample = CausalConv1d(
            config.dim,
            config.dim,
            2 * config.frame_stride,
            config.frame_stride,
            bias=False,
            pad_mode="replicate",
        )
        self.quantizer = SplitResidualQuantizer(config)
        self.upsample = CausalConvTranspose1d(
            config.dim,
            config.dim,
            2 * config.frame_stride,
            config.frame_stride,
            groups=config.dim,
            bias=False,
        )
        self.decoder_transformer = Transformer(config)
        self.decoder = SEANetDecoder(config)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike = DEFAULT_REPO,
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        num_codebooks: int = 32,
    ) -> Mimi:
        """Load published weights from a hub repo id, a local folder or a file.

        Accepts the moshi layout (`kyutai/moshiko-pytorch-bf16`, the default), the
        transformers layout (`kyutai/mimi`) and the `codec_model.*` part of a
        transformers-layout CSM checkpoint. Weights are read tensor by tensor straight into
        `dtype` (default float32) on `device` (default CPU).
        """
        dtype = torch.float32 if dtype is None else dtype
        config = MimiConfig()
        with torch.device("meta"):
            model = cls(config, num_codebooks)
        state = load_weights(source, model.state_dict(), revision=revision, device=device, dtype=dtype)
        model.load_state_dict(state, assign=True)
        return model.eval()

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def frame_size(self) -> int:
        return self.config.frame_size

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Codes [B, num_codebooks, ceil(L / 1920)] (int64) of audio [B, 1, L] at 24 kHz.

        A length that is not a multiple of 1920 is padded as CSM's Mimi did (each
        convolution completes its last window), so its last frame sees a partial window.
        """
        self._check_wav(wav)
        return self._encode(wav, None)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Audio [B, 1, T * 1920] of codes [B, K, T] (K <= 32 leading codebooks, values < 2048)."""
        self._check_codes(codes)
        return self._decode(codes, None)

    def encode_stream(self, batch_size: int = 1) -> EncodeStream:
        """A streaming encoder: feed it multiples of 1920 samples, get their frames."""
        return EncodeStream(self, batch_size)

    def decode_stream(self, batch_size: int = 1) -> DecodeStream:
        """A streaming decoder: feed it one or more frames, get their 1920 samples each."""
        return DecodeStream(self, batch_size)

    def _encode(self, wav: torch.Tensor, state: _EncoderState | None) -> torch.Tensor:
        weight = self.downsample.weight
        wav = wav.to(device=weight.device, dtype=weight.dtype)
        x = self.encoder(wav, None if state is None else state.seanet)
        x = self.encoder_transformer(x, None if state is None else state.transformer)
        x = self.downsample(x, None if state is None else state.downsample)
        return self.quantizer.encode(x, self.num_codebooks)

    def _decode(self, codes: torch.Tensor, state: _DecoderState | None) -> torch.Tensor:
        x = self.quantizer.decode(codes.to(device=self.downsample.weight.device, dtype=torch.long))
        x = self.upsample(x, None if state is None else state.upsample)
        x = self.decoder_transformer(x, None if state is None else state.transformer)
        return self.decoder(x, None if state is None else state.seanet).float()

    def _check_wav(self, wav: torch.Tensor) -> None:
        if not isinstance(wav, torch.Tensor) or wav.dim() != 3:
            raise ValueError(f"audio must be a tensor [batch, 1, samples], got {_describe(wav)}")
        if wav.shape[1] != 1:
            raise ValueError(f"Mimi encodes mono audio: expected 1 channel, got {wav.shape[1]} (downmix first)")
        if wav.shape[0] == 0 or wav.shape[2] == 0:
            raise ValueError(f"audio is empty: shape {tuple(wav.shape)}")
        if not wav.is_floating_point():
            raise ValueError(f"audio must be floating point samples in [-1, 1], got dtype {wav.dtype}")
        if not torch.isfinite(wav).all():
            raise ValueError("audio contains NaN or infinite samples")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            raise ValueError(f"codes must be a tensor [batch, codebooks, frames], got {_describe(codes)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        batch, codebooks, frames = codes.shape
        if batch == 0 or frames == 0:
            raise ValueError(f"codes are empty: shape {tuple(codes.shape)}")
        if not 1 <= codebooks <= self.config.num_codebooks:
            raise ValueError(f"codes must have 1..{self.config.num_codebooks} codebooks, got {codebooks}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.config.codebook_size:
            raise ValueError(f"codes must be in 0..{self.config.codebook_size - 1}, got values in {low}..{high}")


@dataclass
class _EncoderState:
    seanet: SEANetState
    transformer: TransformerState
    downsample: ConvState


@dataclass
class _DecoderState:
    upsample: ConvState
    transformer: TransformerState
    seanet: SEANetState

    def leading(self, rows: int, decoder: SEANetDecoder) -> _DecoderState:
        """The state of batch rows 0 .. rows-1 alone; `store_leading` takes it back."""
        return _DecoderState(
            self.upsample.leading(rows), self.transformer.leading(rows), decoder.leading(self.seanet, rows)
        )

    def store_leading(self, part: _DecoderState, decoder: SEANetDecoder) -> None:
        self.upsample.store_leading(part.upsample)
        self.transformer.store_leading(part.transformer)
        for conv, conv_part in zip(decoder.conv_states(self.seanet), decoder.conv_states(part.seanet), strict=True):
            conv.store_leading(conv_part)


class EncodeStream:
    """Encodes audio chunk by chunk, with the codes `Mimi.encode` gives for the whole.

    `step(wav [B, 1, n * 1920])` returns codes [B, K, n]; `reset()` starts a new stream.
    """

    def __init__(self, mimi: Mimi, batch_size: int):
        self.mimi = mimi
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        mimi = self.mimi
        self._state = _EncoderState(
            mimi.encoder.new_state(), mimi.encoder_transformer.new_state(self.batch_size), ConvState()
        )

    @torch.inference_mode()
    def step(self, wav: torch.Tensor) -> torch.Tensor:
        self.mimi._check_wav(wav)
        if wav.shape[0] != self.batch_size:
            raise ValueError(f"this stream has batch size {self.batch_size}, got audio of batch {wav.shape[0]}")
        if wav.shape[-1] % self.mimi.frame_size:
            raise ValueError(
                f"stream audio in multiples of {self.mimi.frame_size} samples, got {wav.shape[-1]}; "
                f"pad the end of the stream with zeros or use Mimi.encode"
            )
        return self.mimi._encode(wav, self._state)


@dataclass
class RowState:
    """One batch row's place in a `DecodeStream` (see `DecodeStream.save`)."""

    tails: list[torch.Tensor | None]  # each convolution's carried input, upsample first
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # the transformer's keys and values, per layer
    position: torch.Tensor
    slot_positions: torch.Tensor
    next_slot: int  # where the ring stood when it was saved


class DecodeStream:
    """Decodes codes frame by frame, with the audio `Mimi.decode` gives for the whole.

    `step(codes [B, K, t])` returns audio [B, 1, t * 1920]; `reset()` starts a new stream, and
    `reset(rows)` a new one in those batch rows only, while the other rows stream on. A step
    may also take only the leading rows (codes [n, K, t], n < B), so that a batch with idle
    rows above its streams pays for the rows in use only.
    """

    def __init__(self, mimi: Mimi, batch_size: int):
        self.mimi = mimi
        self.batch_size = batch_size
        self.reset()

    @torch.inference_mode()
    def reset(self, rows: Sequence[int] | slice | None = None) -> None:
        """Start afresh all rows (None), or only `rows` (batch indices, or a slice of them):
        each of those rows then decodes its next codes as a new `decode_stream(1)` would."""
        mimi = self.mimi
        if rows is None:
            self._state = _DecoderState(
                ConvState(), mimi.decoder_transformer.new_state(self.batch_size), mimi.decoder.new_state()
            )
            self._started = False
            return
        index = torch.tensor(self._row_indices(rows), dtype=torch.long, device=mimi.downsample.weight.device)
        self._state.upsample.reset(index)
        self._state.transformer.reset(index)
        mimi.decoder.reset_rows(self._state.seanet, index)

    def _row_indices(self, rows: Sequence[int] | slice) -> list[int]:
        if isinstance(rows, slice):
            return list(range(self.batch_size)[rows])
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
            raise TypeError(f"rows must be a sequence of row indices or a slice, got {type(rows).__name__}")
        for row in rows:
            if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.batch_size:
                raise ValueError(f"rows must be indices in 0..{self.batch_size - 1}, got {row!r}")
        return list(rows)

    @torch.inference_mode()
    def save(self, row: int) -> RowState:
        """A copy of batch row `row`'s place in the stream (after its first step), so that a
        stream can stand aside while the others go on and come back in any row (`restore`)."""
        self._row_indices([row])
        state, decoder = self._state, self.mimi.decoder
        if not self._started:
            raise RuntimeError("save a row after the stream's first step")
        convs = [state.upsample, *decoder.conv_states(state.seanet)]
        tails = [None if conv.tail is None else conv.tail[row].clone() for conv in convs]
        transformer = state.transformer
        return RowState(
            tails,
            [(cache.keys[row].clone(), cache.values[row].clone()) for cache in transformer.caches],
            transformer.positions[row].clone(),
            transformer.slot_positions[row].clone(),
            transformer.next_slot,
        )

    @torch.inference_mode()
    def restore(self, row: int, saved: RowState) -> None:
        """Put a `save`d place into batch row `row`: it decodes on as if it had never left.

        The transformer's ring turns for every row at once: the row's slots are turned by the
        steps taken since it was saved, so that its next step writes after its last one.
        """
        self._row_indices([row])
        state, decoder = self._state, self.mimi.decoder
        for conv, tail in zip([state.upsample, *decoder.conv_states(state.seanet)], saved.tails, strict=True):
            if tail is not None:  # a pointwise convolution carries nothing
                conv.tail[row] = tail
        transformer = state.transformer
        if saved.slot_positions.shape[0] != transformer.slots:
            raise RuntimeError("the ring grew since the row was saved; step one frame at a time")
        turn = transformer.next_slot - saved.next_slot
        for cache, (keys, values) in zip(transformer.caches, saved.caches, strict=True):
            cache.keys[row] = keys.roll(turn, dims=1)
            cache.values[row] = values.roll(turn, dims=1)
        transformer.positions[row] = saved.position
        transformer.slot_positions[row] = saved.slot_positions.roll(turn, dims=0)

    @torch.inference_mode()
    def step(self, codes: torch.Tensor) -> torch.Tensor:
        """Audio [n, 1, t * 1920] of codes [n, K, t] for batch rows 0 .. n-1: every row, or the
        leading ones only while the rows above stand still. A row left standing has lost its
        place in the stream: `reset` it before it decodes again."""
        self.mimi._check_codes(codes)
        rows, frames = codes.shape[0], codes.shape[-1]
        if rows > self.batch_size:
            raise ValueError(f"this stream has batch size {self.batch_size}, got codes of batch {rows}")
        if rows < self.batch_size and self._started and frames == 1:
            part = self._state.leading(rows, self.mimi.decoder)
            audio = self.mimi._decode(codes, part)
            self._state.store_leading(part, self.mimi.decoder)
            return audio
        # Every row: the states take their shapes at the first step, and a chunk of several
        # frames may grow the transformer's ring. Rows above n decode silence.
        if rows < self.batch_size:
            codes = torch.cat([codes, codes.new_zeros(self.batch_size - rows, *codes.shape[1:])])
        audio = self.mimi._decode(codes, self._state)
        self._started = True
        return audio[:rows]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__
