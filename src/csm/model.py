"""CSM: a Llama backbone that reads frames of 33 slots and a depth decoder that writes 32 codes.

Each sequence position carries 32 audio codes and one text token; its embedding is the masked
sum of their embeddings. The backbone turns the sequence into a hidden state whose head picks
codebook 0; the depth decoder then picks codebooks 1..31 one after the other, restarting at
position 0 for every frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from csm import kernels
from csm.devices import embedding_bag_runs_on
from csm.errors import CheckpointError
from csm.llama import FLAVORS, Linear, Llama, LlamaConfig, linear
from csm.sampling import sample_topk

NON_FINITE = -1  # the code of every codebook of a frame sampled from non-finite logits


@dataclass(frozen=True)
class CSMConfig:
    """The five fields of the original `config.json`; defaults are those of CSM-1B.

    A flavor is a name from `csm.llama.FLAVORS` or an explicit `LlamaConfig` (written to
    `config.json` as a mapping of its fields), which lets tests build small models.
    """

    audio_num_codebooks: int = 32
    audio_vocab_size: int = 2051
    backbone_flavor: str | LlamaConfig = "llama-1B"
    decoder_flavor: str | LlamaConfig = "llama-100M"
    text_vocab_size: int = 128256

    def __post_init__(self) -> None:
        for flavor in (self.backbone_flavor, self.decoder_flavor):
            _flavor(flavor)  # an unknown name fails here, listing the known ones

    @property
    def backbone(self) -> LlamaConfig:
        return _flavor(self.backbone_flavor)

    @property
    def decoder(self) -> LlamaConfig:
        return _flavor(self.decoder_flavor)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> CSMConfig:
        """Read an original-layout `config.json`; unknown fields (such as hub metadata) are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        kwargs = {name: value for name, value in fields.items() if name in names}
        for name in ("backbone_flavor", "decoder_flavor"):
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = _llama_config(kwargs[name])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        for name in ("backbone_flavor", "decoder_flavor"):
            flavor = getattr(self, name)
            fields[name] = flavor if isinstance(flavor, str) else dataclasses.asdict(flavor)
        return fields


def _flavor(flavor: str | LlamaConfig) -> LlamaConfig:
    if isinstance(flavor, LlamaConfig):
        return flavor
    if flavor not in FLAVORS:
        raise CheckpointError(f"unknown model flavor {flavor!r}; known flavors: {', '.join(FLAVORS)}")
    return FLAVORS[flavor]


def _llama_config(fields: dict[str, Any]) -> LlamaConfig:
    try:
        return LlamaConfig(**fields)
    except TypeError as error:
        raise CheckpointError(f"invalid explicit flavor in config.json: {error}") from None


class CSM(nn.Module):
    """The network: frame embeddings, backbone, depth decoder, heads, one frame step.

    Load one with `csm.loading.load_for_generation` (the inference form) or
    `csm.loading.load_csm` (the published layout, for training and saving).
    """

    def __init__(self, config: CSMConfig) -> None:
        super().__init__()
        self.config = config
        backbone, decoder = config.backbone, config.decoder
        self.backbone = Llama(backbone)
        self.decoder = Llama(decoder)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, backbone.dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, backbone.dim)
        self.projection = Linear(backbone.dim, decoder.dim)
        self.codebook0_head = Linear(backbone.dim, config.audio_vocab_size)
        self.audio_head = nn.Parameter(
            torch.empty(config.audio_num_codebooks - 1, decoder.dim, config.audio_vocab_size)
        )
        self.register_buffer(
            "codebook_offsets", torch.empty(config.audio_num_codebooks, dtype=torch.long), persistent=False
        )
        # The heads' one-row kernel (`csm.kernels`), chosen by `csm.inference.choose_kernels`.
        self.head_kernel = kernels.MV
        self.init_buffers()

    def init_buffers(self) -> None:
        """Fill the buffers that no checkpoint holds (again after `to_empty`)."""
        config = self.config
        offsets = torch.arange(config.audio_num_codebooks, device=self.codebook_offsets.device)
        self.codebook_offsets.copy_(offsets * config.audio_vocab_size)

    @property
    def max_seq_len(self) -> int:
        return self.config.backbone.max_seq_len

    def setup_caches(self, batch_size: int) -> None:
        """Preallocate the KV caches of both transformers for `batch_size` rows."""
        device = self.codebook_offsets.device
        self.backbone.setup_caches(batch_size, self.max_seq_len)
        # The depth decoder only ever sees the positions of one frame's codebooks.
        self.decoder.setup_caches(batch_size, self.config.audio_num_codebooks)
        depth_positions = torch.arange(self.config.audio_num_codebooks, device=device).expand(batch_size, -1)
        self.register_buffer("depth_positions", depth_positions, persistent=False)

    @property
    def cache_rows(self) -> int:
        """How many rows (sequences) the caches hold; 0 before `setup_caches`."""
        return self.backbone.layers[0].attn.cache.k.shape[0] if self.backbone.has_caches else 0

    def reset_caches(self) -> None:
        self.backbone.reset_caches()
        self.decoder.reset_caches()

    # Only the backbone's cache carries a sequence from one frame to the next: the depth
    # decoder rewrites every slot it reads within each frame. So a row's state is its backbone
    # cache, and these copy it.
    def cache_prefix(self, row: int, length: int) -> torch.Tensor:
        """A copy of cache row `row` at positions 0 .. length-1, for `load_cache_prefix`."""
        return self.backbone.cache_prefix(row, length)

    def load_cache_prefix(self, row: int, prefix: torch.Tensor) -> None:
        """Make positions 0 .. L-1 of cache row `row` those of a `cache_prefix` of length L."""
        self.backbone.load_cache_prefix(row, prefix)

    def copy_cache_row(self, source: int, target: int, length: int) -> None:
        """Move a sequence from cache row `source` (positions 0 .. length-1) to row `target`."""
        self.backbone.copy_cache_row(source, target, length)

    def embed(self, tokens: torch.Tensor, tokens_mask: torch.Tensor) -> torch.Tensor:
        """Frames tokens [B, S, 33] with mask [B, S, 33] -> embeddings [B, S, dim].

        Slots 0..31 are audio codes of codebooks 0..31, slot 32 the text token; only the
        slots whose mask is set contribute.
        """
        batch, seq, _ = tokens.shape
        weights = tokens_mask.to(self.audio_embeddings.weight.dtype)
        codes = tokens[..., :-1] + self.codebook_offsets
        if embedding_bag_runs_on(tokens.device):
            audio = F.embedding_bag(
                codes.flatten(0, 1),
                self.audio_embeddings.weight,
                mode="sum",
                per_sample_weights=weights[..., :-1].flatten(0, 1),
            ).view(batch, seq, -1)
        else:  # older torch on MPS: the same sum, from the gathered rows
            audio = (self.audio_embeddings(codes) * weights[..., :-1, None]).sum(dim=2)
        return audio + self.text_embeddings(tokens[..., -1]) * weights[..., -1:]

    def backbone_hidden(
        self, tokens: torch.Tensor, tokens_mask: torch.Tensor, input_pos: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        """Run the backbone over new positions (cached in rows `rows`): hidden states [B, S, dim]."""
        rows = self._check_caches(tokens.shape[0], rows)
        return self.backbone(self.embed(tokens, tokens_mask), input_pos, rows)

    def depth_logits(self, last_hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Logits of codebooks 1..31 [B, 31, V] given the backbone state [B, dim] and codes [B, 32].

        Teacher-forced: what the depth decoder predicts for codebook k after seeing codes 0..k-1.
        """
        rows = self._check_caches(codes.shape[0], None)
        previous = self.audio_embeddings(codes[:, :-1] + self.codebook_offsets[:-1])
        inputs = torch.cat([last_hidden.unsqueeze(1), previous], dim=1)
        hidden = self.decoder(self.projection(inputs), self.depth_positions[rows], rows)
        return torch.einsum("bkd,kdv->bkv", hidden[:, 1:], self.audio_head)

    @torch.inference_mode()
    def generate_frame(
        self,
        tokens: torch.Tensor,
        tokens_mask: torch.Tensor,
        input_pos: torch.Tensor,
        temperature: float | Sequence[float],
        topk: int | Sequence[int],
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Feed new positions, sample the next frame: codes [B, 32] int64.

        tokens [B, S, 33] int64, tokens_mask [B, S, 33] bool, input_pos [B, S] int64; the
        frame follows the last of the S positions. The B sequences live in cache rows
        `rows` (a contiguous range; default 0 .. B-1), so a caller with caches for N rows can
        step any range of them. Rows may be at different positions: to batch prompts of
        different lengths, left-pad a shorter row with positions it has not reached yet (its
        real positions never attend to them, and its next frames overwrite them).
        `temperature`, `topk` and `generator` are one for all rows or one per row; see
        `csm.sampling.sample_topk`. Deciding when speech ends is the caller's.
        """
        rows = self._check_caches(tokens.shape[0], rows)
        last_hidden = self.backbone_hidden(tokens, tokens_mask, input_pos, rows)[:, -1]
        return self.sample_frame(last_hidden, temperature, topk, generator, rows)

    @torch.inference_mode()
    def sample_frame(
        self,
        last_hidden: torch.Tensor,
        temperature: float | Sequence[float],
        topk: int | Sequence[int],
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """The frame that follows backbone states last_hidden [B, dim]: codes [B, 32] int64.

        The second half of `generate_frame`, for a caller that ran the backbone itself, such as
        an engine that gives a row its first frame in the same depth-decoder pass as the others.
        A row whose logits went non-finite anywhere (NaN or infinity in its backbone state, a
        head or the depth decoder) gets code -1 in every codebook (`NON_FINITE`).
        """
        rows = self._check_caches(last_hidden.shape[0], rows)
        logits = self.codebook0_head(last_hidden)
        finite = torch.isfinite(logits).all(dim=-1)
        first = sample_topk(logits, topk, temperature, generator)
        codes = [first]
        # No decoder cache reset is needed: positions restart at 0 and every slot a position
        # attends to is written earlier in the same frame.
        inputs = torch.cat([last_hidden.unsqueeze(1), self.audio_embeddings(first)], dim=1)
        depth_positions = self.depth_positions[rows]
        positions = depth_positions[:, :2]
        for k in range(1, self.config.audio_num_codebooks):
            logits = self.depth_step(inputs, positions, rows, self.audio_head[k - 1])
            finite &= torch.isfinite(logits).all(dim=-1)
            code = sample_topk(logits, topk, temperature, generator)
            codes.append(code)
            inputs = self.audio_embeddings(code + self.codebook_offsets[k])
            positions = depth_positions[:, k + 1 : k + 2]
        # Non-finite logits sample code 0, and an all-zero frame reads as the end of speech: a
        # value no codebook has keeps such a row from ending in silence as if nothing were wrong.
        return torch.cat(codes, dim=1).masked_fill(~finite[:, None], NON_FINITE)

    def depth_step(
        self, inputs: torch.Tensor, positions: torch.Tensor, rows: slice, head: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, V] of one codebook: the depth decoder over inputs [B, S, backbone dim] at
        positions [B, S], through that codebook's head [decoder dim, V]."""
        hidden = self.decoder(self.projection(inputs), positions, rows)[:, -1]
        if head.t().is_contiguous():  # laid out as rows by `csm.inference.prepare`
            return linear(hidden, head.t(), self.head_kernel)
        return torch.mm(hidden, head)

    def _check_caches(self, batch_size: int, rows: slice | None) -> slice:
        """The cache rows a batch of `batch_size` runs in: `rows`, or 0 .. batch_size-1."""
        cached = self.cache_rows
        if not cached:
            raise ValueError("call setup_caches(batch_size) before running the model")
        rows = slice(0, batch_size) if rows is None else rows
        start, stop, step = rows.indices(cached)
        if step != 1 or stop - start != batch_size or rows.stop is not None and rows.stop > cached:
            raise ValueError(
                f"a batch of {batch_size} needs {batch_size} contiguous cache rows within the {cached} set up, "
                f"got rows {rows.start}..{rows.stop}"
            )
        return slice(start, stop)
