"""Text and audio codes as CSM frames: 33 slots per position, 32 audio codes then one text token."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from csm import hub
from csm.errors import CheckpointError, WeightsNotFoundError

NUM_CODEBOOKS = 32
FRAME_SLOTS = NUM_CODEBOOKS + 1
TOKENIZER_FILE = "tokenizer.json"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Where the Llama-3 tokenizer lies when the model repo has none: an ungated copy first, since
# meta-llama's repo needs its own terms accepted.
FALLBACK_TOKENIZER_SOURCES = ("unsloth/Llama-3.2-1B", "meta-llama/Llama-3.2-1B")


def load_tokenizer(
    source: hub.Source | None = None, *, model_source: hub.Source = "sesame/csm-1b", revision: str | None = None
) -> Tokenizer:
    """The Llama-3 tokenizer, adding BOS and EOS around every text as CSM was trained.

    `source` (a tokenizer.json, or a folder or hub repo holding one) wins; otherwise the
    model's own folder or repo (at `revision`), then `FALLBACK_TOKENIZER_SOURCES`.
    """
    if source is not None:
        return _with_template(_read(hub.resolve_file(source, [TOKENIZER_FILE])))
    model_path = Path(model_source).expanduser()
    if model_path.is_file():  # a weights file: its tokenizer would lie beside it
        model_source = model_path.parent
    attempts = [(model_source, revision), *((fallback, None) for fallback in FALLBACK_TOKENIZER_SOURCES)]
    failures = []
    for candidate, candidate_revision in attempts:
        try:
            return _with_template(_read(hub.resolve_file(candidate, [TOKENIZER_FILE], revision=candidate_revision)))
        except WeightsNotFoundError as error:
            failures.append(f"  {candidate}: {error}")
    raise WeightsNotFoundError(
        "no Llama-3 tokenizer.json found; tried:\n" + "\n".join(failures) + "\n"
        "pass a tokenizer.json (or a folder or hub repo with one) explicitly, or make one of "
        "these repos reachable (log in with `huggingface-cli login` or set HF_TOKEN; accept the "
        "terms of gated repos on their model pages)"
    )


def _read(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for unreadable files
        raise CheckpointError(f"{path} is not a readable tokenizer.json: {error}") from None


def _with_template(tokenizer: Tokenizer) -> Tokenizer:
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    if bos is None or eos is None:
        raise CheckpointError(f"the tokenizer lacks {BOS} or {EOS}: not a Llama-3 tokenizer")
    tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} {BOS} $B {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    return tokenizer


def text_frames(tokenizer: Tokenizer, text: str, speaker: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One position per token of `"[{speaker}]{text}"`: tokens [S, 33] int64 and mask [S, 33] bool."""
    ids = torch.tensor(tokenizer.encode(f"[{speaker}]{text}").ids, dtype=torch.long)
    tokens = torch.zeros(len(ids), FRAME_SLOTS, dtype=torch.long)
    tokens[:, -1] = ids
    mask = torch.zeros(len(ids), FRAME_SLOTS, dtype=torch.bool)
    mask[:, -1] = True
    return tokens, mask


def audio_frames(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mimi codes [32, T] as T positions plus the all-zero end-of-audio frame: [T + 1, 33] each."""
    if codes.dim() != 2 or codes.shape[0] != NUM_CODEBOOKS:
        raise ValueError(f"expected audio codes of shape [{NUM_CODEBOOKS}, frames], got {list(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"audio codes must be integers, got {codes.dtype}")
    tokens = torch.zeros(codes.shape[1] + 1, FRAME_SLOTS, dtype=torch.long)
    tokens[:-1, :-1] = codes.t()
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :-1] = True
    return tokens, mask
