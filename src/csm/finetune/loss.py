"""The CSM training loss: codebook 0 from the backbone, codebooks 1..31 from the depth decoder.

- Backbone term: cross-entropy of codebook 0 of every trained frame (end-of-audio frames
  included), each predicted from the backbone's hidden state at the previous position.
- Depth-decoder term: cross-entropy of codebooks 1..31 of the selected frames
  (`TrainingBatch.decoder_frames`), with the inference inputs `[h_{t-1}, c0 .. c30]`.
Each term is a sum over its tokens here; dividing by the token count of the whole
optimizer step (`LossTerms.loss`) makes it a per-token mean that does not depend on batch
size or gradient accumulation. It runs the model's cache-free causal forward: the model
must have no caches set up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from csm.finetune.batches import TrainingBatch
from csm.model import CSM


@dataclass(frozen=True)
class LossTerms:
    backbone_sum: torch.Tensor
    backbone_tokens: int
    decoder_sum: torch.Tensor
    decoder_tokens: int

    def loss(
        self, backbone_tokens: int, decoder_tokens: int, c0_weight: float = 1.0, decoder_weight: float = 1.0
    ) -> torch.Tensor:
        """The weighted loss, each term divided by its token count over the optimizer step."""
        return c0_weight * self.backbone_sum / backbone_tokens + decoder_weight * self.decoder_sum / decoder_tokens


def token_counts(batch: TrainingBatch, num_codebooks: int) -> tuple[int, int]:
    """(codebook-0 tokens, depth-decoder tokens) of a batch."""
    return batch.frames[0].numel(), batch.decoder_frames[0].numel() * (num_codebooks - 1)


def loss_terms(model: CSM, batch: TrainingBatch) -> LossTerms:
    """Both loss terms of `batch` as sums over their tokens."""
    hidden = model.backbone(model.embed(batch.tokens, batch.mask), batch.positions)
    rows, positions = batch.frames
    logits = model.codebook0_head(hidden[rows, positions - 1])
    backbone_sum = F.cross_entropy(logits.float(), batch.tokens[rows, positions, 0], reduction="sum")

    rows, positions = batch.decoder_frames
    codes = batch.tokens[rows, positions, :-1]
    depth = depth_logits(model, hidden[rows, positions - 1], codes)
    decoder_sum = F.cross_entropy(depth.flatten(0, 1).float(), codes[:, 1:].flatten(), reduction="sum")
    backbone_tokens, decoder_tokens = token_counts(batch, model.config.audio_num_codebooks)
    return LossTerms(backbone_sum, backbone_tokens, decoder_sum, decoder_tokens)


def depth_logits(model: CSM, last_hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of codebooks 1..31 [N, 31, V] from backbone states [N, dim] and codes [N, 32]."""
    previous = model.audio_embeddings(codes[:, :-1] + model.codebook_offsets[:-1])
    inputs = model.projection(torch.cat([last_hidden.unsqueeze(1), previous], dim=1))
    positions = torch.arange(codes.shape[1], device=codes.device).expand(codes.shape[0], -1)
    hidden = model.decoder(inputs, positions)
    return torch.einsum("nkd,kdv->nkv", hidden[:, 1:], model.audio_head)
