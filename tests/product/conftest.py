"""Local, random-weight artifacts for the end-to-end tests, built once per session.

The model folder mimics `sesame/csm-1b`: a tiny CSM (original layout), a tiny tokenizer and
the two voice prompts; beside it a random full-size Mimi and random watermark weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from csm.audio import save_audio
from csm.generator import Generator
from csm.loading import load_for_generation
from csm.mimi import Mimi
from csm.text import load_tokenizer
from csm.watermark import Watermarker
from tests.factories.csm import random_state_dict, tiny_config
from tests.factories.mimi import write_moshi_checkpoint
from tests.factories.tokenizer import write_tiny_tokenizer
from tests.factories.watermark import write_silentcipher_repo

MIMI_CODEBOOK_SIZE = 2048


@dataclass(frozen=True)
class Assets:
    model: Path  # folder: config.json, model.safetensors, tokenizer.json, prompts/*.wav
    mimi: Path  # file in the moshi layout
    watermarker: Path  # a copy of the SilentCipher hub repo
    voice_audio: Path  # a short recording to use as context


def write_speakable_csm(folder: Path, seed: int = 0) -> Path:
    """A tiny random CSM whose top-k never holds the 3 codes past Mimi's 2048.

    Zero head weights give those codes logit 0, while the top 50 of 2048 random logits
    are all far above 0; without this a random model would emit undecodable codes.
    """
    config = tiny_config()
    state = random_state_dict(config, seed)
    state["codebook0_head.weight"][MIMI_CODEBOOK_SIZE:] = 0
    state["audio_head"][..., MIMI_CODEBOOK_SIZE:] = 0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(state, folder / "model.safetensors")
    return folder


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    """A quiet, deterministic signal of `seconds` at 24 kHz."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 24_000)) / 24_000
    tone = 0.3 * torch.sin(2 * torch.pi * 180 * t) * torch.sin(2 * torch.pi * 3 * t)
    return (tone + 0.01 * torch.randn(t.shape, generator=generator)).float()


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("artifacts")
    model = write_speakable_csm(root / "csm-1b")
    write_tiny_tokenizer(model / "tokenizer.json")
    (model / "prompts").mkdir()
    save_audio(model / "prompts" / "conversational_a.wav", speech_like(0.5, seed=1), 24_000)
    save_audio(model / "prompts" / "conversational_b.wav", speech_like(0.4, seed=2), 24_000)
    voice_audio = root / "voice.flac"
    save_audio(voice_audio, speech_like(0.3, seed=3), 24_000)
    mimi = write_moshi_checkpoint(root / "mimi.safetensors")
    watermarker = root / "silentcipher"
    write_silentcipher_repo(watermarker)
    return Assets(model=model, mimi=mimi, watermarker=watermarker, voice_audio=voice_audio)


@pytest.fixture(scope="session")
def mimi(assets) -> Mimi:
    return Mimi.from_pretrained(assets.mimi)


@pytest.fixture(scope="session")
def watermarker(assets) -> Watermarker:
    return Watermarker.from_pretrained(assets.watermarker)


@pytest.fixture(scope="session")
def parts(assets, mimi):
    """The model and tokenizer shared by the generators of the tests."""
    model = load_for_generation(assets.model, dtype=torch.float32)
    return model, load_tokenizer(model_source=assets.model)


@pytest.fixture
def generator(parts, mimi, watermarker) -> Generator:
    """A fresh generator (empty context cache) on the shared, loaded networks."""
    model, tokenizer = parts
    return Generator(model, mimi, tokenizer, watermarker)


@pytest.fixture
def plain_generator(parts, mimi) -> Generator:
    """Like `generator`, without a watermark."""
    model, tokenizer = parts
    return Generator(model, mimi, tokenizer)
