"""Text plus conversation context in, 24 kHz speech out: the reference's `Generator` API.

The prompt is the reference's, position by position: for each context segment its text
tokens, its Mimi codes one frame per position and an all-zero end-of-audio frame; then the
text to speak. CSM then emits one 32-code frame per 80 ms until it samples an all-zero
frame or reaches the length limit, and Mimi turns the codes into audio. Context audio is
encoded once and remembered by content, so a conversation loop that passes its growing
history on every call only encodes each new turn.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from csm.audio import check_audio
from csm.devices import default_device, default_dtype
from csm.mimi import Mimi
from csm.model import CSM
from csm.text import audio_frames, load_tokenizer, text_frames
from csm.watermark import CSM_KEY, Watermarker
from csm.watermark.message import check_key
from csm.watermark.stream import watermark_stream

FRAME_MS = 80


@dataclass
class Segment:
    """One utterance of the conversation so far: who spoke, what they said, and how it sounded."""

    speaker: int
    text: str
    # (num_samples,), sample_rate = 24_000
    audio: torch.Tensor


class Generator:
    """Generates speech with a CSM network, a Mimi codec and (optionally) a watermarker.

    One generation runs at a time: starting a new one makes an unfinished stream fail
    rather than return mixed-up audio.
    """

    def __init__(
        self,
        model: CSM,
        mimi: Mimi,
        tokenizer,
        watermarker: Watermarker | None = None,
        *,
        watermark_key: Sequence[int] = CSM_KEY,
        context_cache_size: int = 64,
    ):
        self._model = model
        self._model.setup_caches(1)
        self._mimi = mimi
        self._tokenizer = tokenizer
        self._watermarker = watermarker
        self._watermark_key = list(check_key(watermark_key))
        self._context_codes = _CodeCache(self._encode, context_cache_size)
        self._run = 0
        self.sample_rate = mimi.sample_rate
        self.device = next(model.parameters()).device

    def generate(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment],
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        *,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Speech for `text` said by `speaker` after `context`: 1-D float32, watermarked.

        Stops at the model's end of speech or after `max_audio_length_ms`; `seed` makes
        the sampling reproducible.
        """
        frames = self._frames(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        codes = list(frames)
        if not codes:
            return torch.zeros(0, device=self.device)
        with torch.inference_mode():
            audio = self._mimi.decode(self._for_mimi(torch.stack(codes, dim=-1)))[0, 0]
        return self.watermark(audio.float())

    def generate_stream(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment],
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        *,
        seed: int | None = None,
        chunk_frames: int = 1,
        watermark: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Like `generate`, but yields 1-D float32 chunks as they are made.

        Without a watermark (none loaded, or `watermark=False`) each chunk is `chunk_frames`
        frames, and the joined chunks equal `generate`'s audio (same seed) before its
        watermark. With one, the audio is cut into clips of `csm.watermark.stream.CLIP_SAMPLES`
        (1.04 s; the last one shorter), each marked as a clip of its own, since the watermark
        needs about a second of audio: the first chunk comes after one clip, not one frame.
        """
        if not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {chunk_frames!r}")
        frames = self._frames(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        chunks = self._decode_stream(frames, chunk_frames)
        if watermark and self._watermarker is not None:
            return watermark_stream(chunks, self.watermark)
        return chunks

    def watermark(self, audio: torch.Tensor) -> torch.Tensor:
        """`audio` (at `sample_rate`) with this generator's watermark; unchanged if it has none."""
        if self._watermarker is None or audio.numel() == 0:
            return audio
        with torch.inference_mode():
            marked = self._watermarker.encode(audio, self.sample_rate, key=self._watermark_key, message_sdr=36)
        return marked.float()

    def prompt_length(self, text: str, speaker: int, context: Sequence[Segment]) -> int:
        """How many positions the prompt for these arguments takes (no audio is encoded)."""
        frames = sum(math.ceil(segment.audio.numel() / self._mimi.frame_size) + 1 for segment in context)
        texts = [(segment.text, segment.speaker) for segment in context] + [(text, speaker)]
        return frames + sum(text_frames(self._tokenizer, words, who)[0].shape[0] for words, who in texts)

    def max_prompt_length(self, max_audio_length_ms: float) -> int:
        """The longest prompt that leaves room for `max_audio_length_ms` of audio."""
        return self._model.max_seq_len - _max_frames(max_audio_length_ms) - 1

    def _frames(self, text, speaker, context, max_audio_length_ms, temperature, topk, seed) -> Iterator[torch.Tensor]:
        """Checks the arguments and builds the prompt now; the returned iterator samples frames."""
        _check_request(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        max_frames = _max_frames(max_audio_length_ms)
        length = self.prompt_length(text, speaker, context)
        budget = self.max_prompt_length(max_audio_length_ms)
        if length > budget:
            raise ValueError(
                f"context too long: the prompt takes {length} positions, but with "
                f"max_audio_length_ms={max_audio_length_ms:g} ({max_frames} frames) it must be at most "
                f"{budget} of the model's {self._model.max_seq_len}; shorten the context by "
                f"{length - budget} positions (one position = 80 ms of context audio or one "
                f"text token) or lower max_audio_length_ms"
            )
        tokens, mask = self._prompt(text, speaker, context)
        self._run += 1
        return self._sample(self._run, tokens, mask, max_frames, temperature, topk, seed)

    def _sample(self, run, tokens, mask, max_frames, temperature, topk, seed) -> Iterator[torch.Tensor]:
        rng = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        positions = torch.arange(tokens.shape[0], device=self.device)
        self._model.reset_caches()
        for _ in range(max_frames):
            if run != self._run:
                raise RuntimeError("another generation started on this Generator before this stream finished")
            with torch.inference_mode():
                frame = self._model.generate_frame(
                    tokens[None], mask[None], positions[None], temperature, topk, generator=rng
                )[0]
            if not frame.any():
                return
            yield frame
            # The frame becomes the next position: its 32 audio slots set, the text slot empty.
            tokens = torch.cat([frame, frame.new_zeros(1)])[None]
            mask = torch.cat([torch.ones_like(frame, dtype=torch.bool), frame.new_zeros(1, dtype=torch.bool)])[None]
            positions = positions[-1:] + 1

    def _decode_stream(self, frames: Iterator[torch.Tensor], chunk_frames: int) -> Iterator[torch.Tensor]:
        decoder = self._mimi.decode_stream(1)
        pending: list[torch.Tensor] = []
        for frame in frames:
            pending.append(frame)
            if len(pending) == chunk_frames:
                yield self._decode_step(decoder, pending)
                pending = []
        if pending:
            yield self._decode_step(decoder, pending)

    def _decode_step(self, decoder, frames: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return decoder.step(self._for_mimi(torch.stack(frames, dim=-1)))[0, 0].float()

    def _prompt(self, text: str, speaker: int, context: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for segment in context:
            parts.append(text_frames(self._tokenizer, segment.text, segment.speaker))
            parts.append(audio_frames(self._context_codes(segment.audio)))
        parts.append(text_frames(self._tokenizer, text, speaker))
        tokens = torch.cat([part[0].to(self.device) for part in parts])
        mask = torch.cat([part[1].to(self.device) for part in parts])
        return tokens, mask

    def _encode(self, audio: torch.Tensor) -> torch.Tensor:
        parameter = next(self._mimi.parameters())
        with torch.inference_mode():
            codes = self._mimi.encode(audio.to(parameter.device, parameter.dtype)[None, None])
        return codes[0].to(self.device)

    def _for_mimi(self, codes: torch.Tensor) -> torch.Tensor:
        """[32, T] codes from CSM as Mimi's [1, 32, T] input."""
        return codes[None].to(next(self._mimi.parameters()).device)


def load_csm_1b(
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype | None = None,
    model: str = "sesame/csm-1b",
    mimi: str = "kyutai/moshiko-pytorch-bf16",
    tokenizer: str | None = None,
    watermark: bool | Sequence[int] = True,
    watermarker: str = "sony/silentcipher",
    revision: str | None = None,
) -> Generator:
    """A ready `Generator` for CSM-1B.

    `model`, `mimi`, `tokenizer` and `watermarker` each take a hub repo id, a local folder
    or a file, so a fully offline install works; the tokenizer defaults to the one
    published with the model. `device` defaults to cuda, else mps, else cpu; `dtype` (of
    the CSM network) to `csm.devices.default_dtype(device)`. `watermark` is True for the
    reference's public key, False for none, or your own 5-byte key; `revision` pins the
    model repo.
    """
    key = _watermark_key(watermark)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    network = CSM.from_pretrained(model, revision=revision, device=device, dtype=dtype)
    codec = Mimi.from_pretrained(mimi, device=device, dtype=torch.float32, num_codebooks=32)
    text_tokenizer = load_tokenizer(tokenizer, model_source=model, revision=revision)
    marker = Watermarker.from_pretrained(watermarker, device=device) if key else None
    return Generator(network, codec, text_tokenizer, marker, watermark_key=key or CSM_KEY)


def _watermark_key(watermark: bool | Sequence[int]) -> tuple[int, ...] | None:
    """The key that `load_csm_1b(watermark=...)` asks for, checked before anything loads."""
    if watermark is True:
        return tuple(CSM_KEY)
    if watermark is False or watermark is None:
        return None
    return check_key(watermark)


def _max_frames(max_audio_length_ms: float) -> int:
    return int(max_audio_length_ms / FRAME_MS)


def _check_request(text, speaker, context, max_audio_length_ms, temperature, topk, seed) -> None:
    """A ValueError naming the first bad argument; the reference would fail deep inside instead."""
    _check_utterance(text, speaker, "text", "speaker")
    if isinstance(context, (str, bytes)) or not isinstance(context, Sequence):
        raise ValueError(f"context must be a list of Segment, got {type(context).__name__}")
    for index, segment in enumerate(context):
        if not all(hasattr(segment, name) for name in ("speaker", "text", "audio")):
            raise ValueError(f"context[{index}] must be a Segment, got {type(segment).__name__}")
        _check_utterance(segment.text, segment.speaker, f"context[{index}].text", f"context[{index}].speaker")
        check_audio(segment.audio, f"context[{index}].audio")
    if not isinstance(max_audio_length_ms, (int, float)) or not _max_frames(max_audio_length_ms) >= 1:
        raise ValueError(f"max_audio_length_ms must be at least {FRAME_MS} (one frame), got {max_audio_length_ms!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not _is_int(topk) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _check_utterance(text, speaker, text_name: str, speaker_name: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text_name} must be a non-empty string, got {text!r}")
    if not _is_int(speaker) or speaker < 0:
        raise ValueError(f"{speaker_name} must be a non-negative integer, got {speaker!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _CodeCache:
    """Mimi codes of context audio, remembered by the audio's content (least recently used out)."""

    def __init__(self, encode, capacity: int):
        self._encode = encode
        self._capacity = capacity
        self._codes: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        samples = audio.detach().to("cpu", torch.float32).contiguous()
        key = hashlib.blake2b(samples.numpy().tobytes(), digest_size=16).hexdigest()
        if key in self._codes:
            self._codes.move_to_end(key)
            return self._codes[key]
        codes = self._encode(samples)
        self._codes[key] = codes
        if len(self._codes) > self._capacity:
            self._codes.popitem(last=False)
        return codes
