"""Utterances in rows of the KV caches: each prompt prefilled on its own, then frames for all rows at once.

`Generator.generate` runs one `Utterance` in row 0; `Generator.generate_batch` and the engine
run one per row. All go through `CacheRows`, so that a row computes what it computes alone:
- a prompt is prefilled in its own row, in chunks cut at the end of every context segment and
  every `PREFILL_CHUNK` positions, so a context prefix copied from the `PrefixKVCache` is bit
  for bit the state a fresh prefill leaves;
- only one-frame steps are batched, each row sampling from its own generator: the backbone's
  step of the decoding rows, and the depth decoder's pass, which a row whose prompt just went
  in joins for its first frame (`feed`, `advance`, `sample`).

The rows of the utterances that decode together must be contiguous (one step covers a range of
rows): `move` copies an utterance to another row, for keeping them packed at the bottom.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csm.errors import GenerationError
from csm.model import CSM, NON_FINITE
from csm.prefix_cache import PrefixKVCache

# Prompt positions per prefill step. A step of this many positions costs about as much as a
# batched one-frame step on a CPU, so an engine interleaving the two stalls running rows for
# about one frame per chunk.
PREFILL_CHUNK = 64


@dataclass(frozen=True)
class Prompt:
    """A request's prompt frames, and where each context prefix ends with its content key."""

    tokens: torch.Tensor  # [S, 33] int64
    mask: torch.Tensor  # [S, 33] bool
    prefixes: tuple[tuple[int, str], ...] = ()  # (length, key), shortest first, all shorter than S

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass(frozen=True)
class Sampling:
    """How one utterance samples, and how many frames it may make."""

    temperature: float
    topk: int
    max_frames: int
    generator: torch.Generator | None = None


class Utterance:
    """One utterance in a cache row: how much of its prompt is in, and the frames it made."""

    def __init__(self, prompt: Prompt, sampling: Sampling, row: int):
        self.prompt = prompt
        self.sampling = sampling
        self.row = row
        self.prefilled = 0
        self.frames = 0
        self.last: torch.Tensor | None = None  # the frame to feed next, [32]
        self.done = False
        self.error: GenerationError | None = None  # why it stopped, if it failed

    @property
    def decoding(self) -> bool:
        """Past its prompt and not finished: ready for a batched step."""
        return self.last is not None and not self.done

    @property
    def written(self) -> int:
        """Positions of this utterance in its cache row (the last frame is not fed yet)."""
        return self.prefilled + max(self.frames - 1, 0)

    def emit(self, frame: torch.Tensor, ends_speech: bool) -> torch.Tensor | None:
        """Take a sampled frame: itself, or None when it is the all-zero end of speech (which
        the caller read off the device for all rows at once)."""
        if ends_speech:
            self.done = True
            return None
        self.frames += 1
        self.last = frame
        self.done = self.frames >= self.sampling.max_frames
        return frame


class CacheRows:
    """Runs utterances in the cache rows of `model`, with prompt prefixes from `prefix_cache`."""

    def __init__(self, model: CSM, prefix_cache: PrefixKVCache | None = None):
        self.model = model
        self.prefix_cache = prefix_cache

    @torch.inference_mode()
    def start(self, prompt: Prompt, sampling: Sampling, row: int) -> Utterance:
        """An utterance in `row`, its longest cached context prefix already in place."""
        utterance = Utterance(prompt, sampling, row)
        if self.prefix_cache is not None:
            for length, key in reversed(prompt.prefixes):
                state = self.prefix_cache.get(key)
                if state is not None:
                    self.model.load_cache_prefix(row, state)
                    utterance.prefilled = length
                    break
        return utterance

    @torch.inference_mode()
    def prefill(self, utterance: Utterance) -> torch.Tensor | None:
        """Feed the next chunk of the prompt; after the last one, return the first frame.

        None while the prompt is not all in, or when the first frame is the end of speech
        (then `utterance.done` is set).
        """
        state = self.feed(utterance)
        return None if state is None else self.sample([utterance], state[None])[0]

    @torch.inference_mode()
    def feed(self, utterance: Utterance) -> torch.Tensor | None:
        """Feed the next chunk of the prompt into the backbone; after the last one, return the
        backbone state its first frame follows ([dim], for `sample`), else None."""
        prompt, start = utterance.prompt, utterance.prefilled
        ends = [length for length, _ in prompt.prefixes if length > start]
        end = min([start + PREFILL_CHUNK, len(prompt), *ends])
        tokens, mask = prompt.tokens[None, start:end], prompt.mask[None, start:end]
        positions = torch.arange(start, end, device=tokens.device)[None]
        hidden = self.model.backbone_hidden(tokens, mask, positions, slice(utterance.row, utterance.row + 1))
        utterance.prefilled = end
        if end < len(prompt):
            self._remember(utterance)
            return None
        return hidden[0, -1]

    @torch.inference_mode()
    def decode(self, utterances: Sequence[Utterance]) -> list[torch.Tensor | None]:
        """One frame for each decoding utterance, in one step; their rows must be contiguous, in order."""
        return self.sample(utterances, self.advance(utterances))

    @torch.inference_mode()
    def advance(self, utterances: Sequence[Utterance]) -> torch.Tensor:
        """Feed each decoding utterance its last frame, in one backbone step: the states [n, dim]
        their next frames follow (for `sample`)."""
        rows = self._rows(utterances)
        frames = torch.stack([utterance.last for utterance in utterances])
        # Each frame becomes its row's next position: 32 audio slots set, the text slot empty.
        tokens = torch.cat([frames, frames.new_zeros(len(frames), 1)], dim=1)[:, None]
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[..., -1] = False
        positions = torch.tensor([[utterance.written] for utterance in utterances], device=frames.device)
        return self.model.backbone_hidden(tokens, mask, positions, rows)[:, -1]

    @torch.inference_mode()
    def sample(self, utterances: Sequence[Utterance], states: torch.Tensor) -> list[torch.Tensor | None]:
        """The next frame of each utterance (contiguous rows, in order) from its backbone state
        (states [n, dim]), in one depth-decoder pass: what each `emit`s."""
        frames = self.model.sample_frame(
            states,
            [utterance.sampling.temperature for utterance in utterances],
            [utterance.sampling.topk for utterance in utterances],
            [utterance.sampling.generator for utterance in utterances],
            self._rows(utterances),
        )
        # What each row's frame means, read off the device in one transfer for all rows.
        non_finite, ends_speech = torch.stack([frames[:, 0] == NON_FINITE, ~frames.any(dim=-1)]).tolist()
        emitted = []
        for utterance, frame, failed, ends in zip(utterances, frames, non_finite, ends_speech, strict=True):
            if failed:
                utterance.done = True
                utterance.error = GenerationError(
                    f"non-finite logits at frame {utterance.frames + 1} of this request: the model's numbers "
                    "hold NaN or infinity, so it cannot go on (its audio would be silence)"
                )
                self._clear(utterance.row)
            emitted.append(None if failed else utterance.emit(frame, ends))
        return emitted

    @staticmethod
    def _rows(utterances: Sequence[Utterance]) -> slice:
        rows = slice(utterances[0].row, utterances[-1].row + 1)
        if [utterance.row for utterance in utterances] != list(range(rows.start, rows.stop)):
            raise ValueError("utterances stepped together must be in contiguous rows, in order")
        return rows

    @torch.inference_mode()
    def move(self, utterance: Utterance, row: int) -> None:
        """Put `utterance` in cache row `row` (a copy of the positions it has written)."""
        self.model.copy_cache_row(utterance.row, row, utterance.written)
        utterance.row = row

    def pack(self, utterances: Sequence[Utterance], leaving: Sequence[Utterance] = ()) -> list[Utterance]:
        """The unfinished of `utterances` (in rows 0 .. n-1, in order), but those `leaving` their
        rows, in rows 0 .. m-1.

        The last utterance moves into the row of one that left: one copy per row left.
        """
        packed = list(utterances)
        gone = {id(utterance) for utterance in leaving}

        def left(utterance: Utterance) -> bool:
            return utterance.done or id(utterance) in gone

        index = 0
        while index < len(packed):
            if left(packed[-1]):
                packed.pop()
            elif left(packed[index]):
                last = packed.pop()
                self.move(last, packed[index].row)
                packed[index] = last
                index += 1
            else:
                index += 1
        return packed

    def _clear(self, row: int) -> None:
        """Zero cache row `row` of both transformers. A row that went non-finite leaves NaN in
        slots that the next utterance there does not write: attention gives them zero weight, but
        zero times NaN is still NaN."""
        model = self.model
        depth_slots = model.config.audio_num_codebooks
        for transformer, slots in ((model.backbone, model.max_seq_len), (model.decoder, depth_slots)):
            transformer.load_cache_prefix(row, torch.zeros_like(transformer.cache_prefix(row, slots)))

    def _remember(self, utterance: Utterance) -> None:
        """Keep the KV state of a context prefix that the last chunk completed."""
        if self.prefix_cache is None:
            return
        for length, key in utterance.prompt.prefixes:
            if length == utterance.prefilled and key not in self.prefix_cache:
                self.prefix_cache.put(key, self.model.cache_prefix(utterance.row, length))
