"""Text plus conversation context in, 24 kHz speech out: the reference's `Generator` API.

The prompt is the reference's, position by position: for each context segment its text
tokens, its Mimi codes one frame per position and an all-zero end-of-audio frame; then the
text to speak. CSM then emits one 32-code frame per 80 ms until it samples an all-zero
frame or reaches the length limit, and Mimi turns the codes into audio. Context audio is
encoded once and remembered by content, so a conversation loop that passes its growing
history on every call only encodes each new turn, and the KV state of every context prefix
is kept in a `PrefixKVCache`, so a voice or conversation already heard is not prefilled again.
`generate_batch` makes many utterances together, one per row of the KV caches. An engine
(`csm.engine`) takes the model for itself with `claim` and gives it back with `release`.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from csm.audio import check_audio
from csm.batching import CacheRows, Prompt, Sampling
from csm.devices import default_device, default_dtype
from csm.loading import load_for_generation
from csm.mimi import Mimi
from csm.model import CSM
from csm.prefix_cache import PrefixKVCache
from csm.text import audio_frames, load_tokenizer, text_frames
from csm.sampling import TEMPERATURE_RANGE
from csm.threads import run_in_fresh_thread
from csm.watermark import CSM_KEY, Watermarker
from csm.watermark.message import check_key
from csm.watermark.stream import watermark_stream

FRAME_MS = 80
# Rows that `generate_batch` runs at once: beyond ~8 a CPU step costs about as much per row
# as running the rows apart, and each row holds a 2048-position KV cache.
BATCH_ROWS = 8
# About 40 ten-second voices of CSM-1B in bfloat16 (32 KiB per position).
PREFIX_CACHE_BYTES = 256 * 2**20


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
    rather than return mixed-up audio. `prefix_cache_bytes` bounds the cached KV state of
    context prefixes (`prefix_cache`; 0 turns it off).
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
        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
    ):
        self._model = model
        self._one_row_caches()
        self.prefix_cache = PrefixKVCache(prefix_cache_bytes)
        self._rows = CacheRows(model, self.prefix_cache)
        self._owner = None
        self._mimi = mimi
        self._tokenizer = tokenizer
        self._watermarker = watermarker
        self._watermark_key = list(check_key(watermark_key))
        self._context_codes = _ContextCodeCache(self._encode, context_cache_size)
        self._run = 0
        self.sample_rate = mimi.sample_rate
        self.device = next(model.parameters()).device

    @property
    def model(self) -> CSM:
        return self._model

    @property
    def mimi(self) -> Mimi:
        return self._mimi

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
        return self._clip(list(frames))

    def generate_batch(
        self,
        texts: Sequence[str],
        speakers: Sequence[int],
        contexts: Sequence[Sequence[Segment]],
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        *,
        seeds: Sequence[int | None] | None = None,
    ) -> list[torch.Tensor]:
        """Speech for many utterances made together: one watermarked 1-D float32 clip per entry.

        Entry i is `texts[i]` said by `speakers[i]` after `contexts[i]`, seeded with
        `seeds[i]`; its audio is what `generate` returns for it alone (exactly, in float32).
        Up to `BATCH_ROWS` entries share each frame's pass over the weights; each stops at its
        own end of speech or length, and the next entry takes its row. A bad entry raises a
        ValueError naming its index before any work starts.
        """
        self._check_free()
        count = _check_batch(texts, speakers, contexts, seeds)
        seeds = [None] * count if seeds is None else list(seeds)
        for index in range(count):
            try:
                self.check_request(
                    texts[index], speakers[index], contexts[index], max_audio_length_ms, temperature, topk, seeds[index]
                )
            except ValueError as error:
                raise ValueError(f"entry {index}: {error}") from None
        prompts = [self.prompt(texts[i], speakers[i], contexts[i]) for i in range(count)]
        samplings = [self.sampling(max_audio_length_ms, temperature, topk, seed) for seed in seeds]
        self._run += 1
        return [self._clip(codes) for codes in self._batch_codes(prompts, samplings)]

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

    def check_request(self, text, speaker, context, max_audio_length_ms, temperature, topk, seed) -> None:
        """A ValueError naming the first bad argument of a `generate` call, or a context too long."""
        check_arguments(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        for index, segment in enumerate(context):
            check_audio(segment.audio, f"context[{index}].audio")
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

    def prompt(self, text: str, speaker: int, context: Sequence[Segment]) -> Prompt:
        """The prompt frames of a (checked) request, each context prefix keyed by its content.

        Context audio is encoded here, once per clip.
        """
        parts, prefixes, length = [], [], 0
        content = hashlib.blake2b(digest_size=16)
        for segment in context:
            for tokens, mask in (
                text_frames(self._tokenizer, segment.text, segment.speaker),
                audio_frames(self._context_codes(segment.audio)),
            ):
                parts.append((tokens, mask))
                content.update(tokens.cpu().numpy().tobytes())
                content.update(mask.cpu().numpy().tobytes())
                length += tokens.shape[0]
            prefixes.append((length, content.hexdigest()))
        parts.append(text_frames(self._tokenizer, text, speaker))
        tokens = torch.cat([part[0].to(self.device) for part in parts])
        mask = torch.cat([part[1].to(self.device) for part in parts])
        return Prompt(tokens, mask, tuple(prefixes))

    def sampling(self, max_audio_length_ms: float, temperature: float, topk: int, seed: int | None) -> Sampling:
        """How a (checked) request samples: without a seed, from torch's global generator."""
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        return Sampling(float(temperature), topk, _max_frames(max_audio_length_ms), generator)

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
        self._check_free()
        self.check_request(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        prompt = self.prompt(text, speaker, context)
        self._run += 1
        return self._sample(self._run, prompt, self.sampling(max_audio_length_ms, temperature, topk, seed))

    def _sample(self, run: int, prompt: Prompt, sampling: Sampling) -> Iterator[torch.Tensor]:
        utterance = self._rows.start(prompt, sampling, row=0)
        while not utterance.done:
            if run != self._run:
                raise RuntimeError("another generation started on this Generator before this stream finished")
            decoding = utterance.last is not None
            frame = self._rows.decode([utterance])[0] if decoding else self._rows.prefill(utterance)
            if utterance.error is not None:
                raise utterance.error
            if frame is not None:
                yield frame

    def _batch_codes(self, prompts: list[Prompt], samplings: list[Sampling]) -> list[list[torch.Tensor]]:
        """The frames of every prompt, up to `BATCH_ROWS` of them at a time in rows 0 .. n-1."""
        rows = min(len(prompts), BATCH_ROWS)
        frames: dict[object, list[torch.Tensor]] = {}
        waiting = deque(zip(prompts, samplings))
        running = []
        self._model.setup_caches(rows)
        try:
            while waiting or running:
                while waiting and len(running) < rows:
                    utterance = self._rows.start(*waiting.popleft(), row=len(running))
                    frames[utterance] = []
                    while utterance.last is None and not utterance.done:
                        _keep(frames[utterance], self._rows.prefill(utterance))
                    _raise_error(utterance)
                    running = self._rows.pack([*running, utterance])
                if running:
                    for utterance, frame in zip(running, self._rows.decode(running)):
                        _raise_error(utterance)
                        _keep(frames[utterance], frame)
                    running = self._rows.pack(running)
        finally:
            self._model.setup_caches(1)
        return list(frames.values())

    def _clip(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """The audio of a whole utterance's frames, watermarked."""
        if not frames:
            return torch.zeros(0, device=self.device)
        with torch.inference_mode():
            audio = self._mimi.decode(self._for_mimi(torch.stack(frames, dim=-1)))[0, 0]
        return self.watermark(audio.float())

    def claim(self, owner: object) -> None:
        """Lend the model to `owner` (an engine) until `release(owner)`.

        Meanwhile `generate`, `generate_stream` and `generate_batch` raise RuntimeError (a stream
        not finished fails at its next frame), and the owner may set the model's caches up for
        as many rows as it runs; `check_request`, `prompt`, `sampling` and `watermark` stay
        available. RuntimeError if the model is lent already.
        """
        self._check_free()
        self._owner = owner
        self._run += 1

    def release(self, owner: object) -> None:
        """Take the model back from `owner`, with caches for one row again; nothing happens if
        `owner` does not hold it."""
        if self._owner is owner:
            self._owner = None
            self._one_row_caches()

    def _one_row_caches(self) -> None:
        """Give the model caches for one row, made on a thread that ends: making them is parallel
        torch work, which would leave the caller's thread holding OpenMP workers, so that an
        engine started after (or another engine after a closed one) would run slower (see
        csm.threads; an engine's frames took ~15% longer and its Mimi steps twice as long)."""
        run_in_fresh_thread(self._model.setup_caches, 1)

    def _check_free(self) -> None:
        if self._owner is not None:
            raise RuntimeError("this Generator's model is owned by an Engine: submit requests to it, or close it first")

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
    quantize: str | None = None,
    compile: bool = False,
    adapter: str | None = None,
) -> Generator:
    """A ready `Generator` for CSM-1B.

    `model`, `mimi`, `tokenizer` and `watermarker` each take a hub repo id, a local folder
    or a file, so a fully offline install works; the tokenizer defaults to the one
    published with the model. `device` defaults to cuda, else mps, else cpu; `dtype` (of
    the CSM network) to `csm.devices.default_dtype(device)`. `watermark` is True for the
    reference's public key, False for none, or your own 5-byte key; `revision` pins the
    model repo. `quantize` ("int8" or "int4", bfloat16 activations) and `compile` are
    `csm.loading.load_for_generation`'s; a folder written by `csm quantize` loads quantized as it is.
    `adapter` is a fine-tuned LoRA adapter (PEFT format: hub repo id, folder or file), merged
    into the CSM weights as they load.
    """
    key = _watermark_key(watermark)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:  # the caller's current GPU, not the loading thread's
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or (torch.bfloat16 if quantize else default_dtype(device))

    def load() -> Generator:
        network = load_for_generation(
            model, revision=revision, device=device, dtype=dtype, quantize=quantize, compile=compile, adapter=adapter
        )
        codec = Mimi.from_pretrained(mimi, device=device, dtype=torch.float32, num_codebooks=32)
        text_tokenizer = load_tokenizer(tokenizer, model_source=model, revision=revision)
        marker = Watermarker.from_pretrained(watermarker, device=device) if key else None
        return Generator(network, codec, text_tokenizer, marker, watermark_key=key or CSM_KEY)

    # Loading's torch work leaves no OpenMP workers behind on the caller's thread, which may
    # never use them (an engine or a server generates on threads of their own).
    return run_in_fresh_thread(load)


def _watermark_key(watermark: bool | Sequence[int]) -> tuple[int, ...] | None:
    """The key that `load_csm_1b(watermark=...)` asks for, checked before anything loads."""
    if watermark is True:
        return tuple(CSM_KEY)
    if watermark is False or watermark is None:
        return None
    return check_key(watermark)


def _max_frames(max_audio_length_ms: float) -> int:
    return int(max_audio_length_ms / FRAME_MS)


def check_arguments(text, speaker, context, max_audio_length_ms, temperature, topk, seed) -> None:
    """A ValueError naming the first bad argument; the reference would fail deep inside instead.

    Types, shapes and ranges only, no torch work, so any thread may check at once; the samples
    of context audio (finite?) and the prompt's length are `Generator.check_request`'s.
    """
    _check_utterance(text, speaker, "text", "speaker")
    if isinstance(context, (str, bytes)) or not isinstance(context, Sequence):
        raise ValueError(f"context must be a list of Segment, got {type(context).__name__}")
    for index, segment in enumerate(context):
        if not all(hasattr(segment, name) for name in ("speaker", "text", "audio")):
            raise ValueError(f"context[{index}] must be a Segment, got {type(segment).__name__}")
        _check_utterance(segment.text, segment.speaker, f"context[{index}].text", f"context[{index}].speaker")
        name = f"context[{index}].audio"
        if not isinstance(segment.audio, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(segment.audio).__name__}")
        if segment.audio.ndim != 1:
            raise ValueError(f"{name} must be 1-D (mono samples), got shape {tuple(segment.audio.shape)}")
        if segment.audio.numel() == 0:
            raise ValueError(f"{name} is empty")
    if not isinstance(max_audio_length_ms, (int, float)) or not _max_frames(max_audio_length_ms) >= 1:
        raise ValueError(f"max_audio_length_ms must be at least {FRAME_MS} (one frame), got {max_audio_length_ms!r}")
    low, high = TEMPERATURE_RANGE
    if not isinstance(temperature, (int, float)) or not low <= temperature <= high:
        raise ValueError(f"temperature must be a number from {low} to {high}, got {temperature!r}")
    if not _is_int(topk) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _check_utterance(text, speaker, text_name: str, speaker_name: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text_name} must be a non-empty string, got {text!r}")
    if not _is_int(speaker) or speaker < 0:
        raise ValueError(f"{speaker_name} must be a non-negative integer, got {speaker!r}")


def _check_batch(texts, speakers, contexts, seeds) -> int:
    """The number of entries of a `generate_batch` call whose lists agree in length."""
    lists = {"texts": texts, "speakers": speakers, "contexts": contexts}
    if seeds is not None:
        lists["seeds"] = seeds
    for name, value in lists.items():
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{name} must be a list with one entry per utterance, got {type(value).__name__}")
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"texts, speakers, contexts and seeds must have one entry each per utterance, got {lengths}")
    if not lengths["texts"]:
        raise ValueError("texts is empty: give at least one utterance")
    return lengths["texts"]


def _raise_error(utterance) -> None:
    if utterance.error is not None:
        raise utterance.error


def _keep(frames: list[torch.Tensor], frame: torch.Tensor | None) -> None:
    if frame is not None:
        frames.append(frame)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _ContextCodeCache:
    """Mimi codes of context audio, remembered by the audio's content (least recently used out)."""

    def __init__(self, encode, capacity: int):
        self._encode = encode
        self._capacity = capacity
        self._codes: OrderedDict[str, torch.Tensor] = OrderedDict()
        # An engine makes prompts on a thread of its own while the generator's owner may call
        # `prompt` too; the lock keeps the dict whole (a clip may then be encoded twice).
        self._lock = threading.Lock()

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        samples = audio.detach().to("cpu", torch.float32).contiguous()
        key = hashlib.blake2b(samples.numpy().tobytes(), digest_size=16).hexdigest()
        with self._lock:
            if key in self._codes:
                self._codes.move_to_end(key)
                return self._codes[key]
        codes = self._encode(samples)
        with self._lock:
            self._codes[key] = codes
            if len(self._codes) > self._capacity:
                self._codes.popitem(last=False)
        return codes
