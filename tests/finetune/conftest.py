"""A tiny CSM, a random full-size Mimi and small datasets of clips, built once per session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from csm.audio import save_audio
from tests.factories.mimi import write_moshi_checkpoint
from tests.factories.tokenizer import write_tiny_tokenizer
from tests.factories.watermark import write_silentcipher_repo
from tests.product.conftest import speech_like, write_speakable_csm

TEXTS = ["Hello there, how are you today?", "The past is just a story."]


@dataclass(frozen=True)
class Assets:
    model: Path
    mimi: Path
    watermarker: Path
    clips: Path  # a folder of clips with their transcripts
    manifest: Path  # two conversations: a context turn, then a trained one
    codes: Path  # the Mimi code cache shared by the tests, so each clip is encoded once


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("finetune")
    model = write_speakable_csm(root / "csm-1b")
    write_tiny_tokenizer(model / "tokenizer.json")
    mimi = write_moshi_checkpoint(root / "mimi.safetensors")
    watermarker = root / "silentcipher"
    write_silentcipher_repo(watermarker)
    clips = root / "clips"
    clips.mkdir()
    for index, text in enumerate(TEXTS):
        save_audio(clips / f"clip{index}.wav", speech_like(0.4, seed=10 + index), 24_000)
        (clips / f"clip{index}.txt").write_text(text)
    manifest = root / "data" / "train.jsonl"
    manifest.parent.mkdir()
    lines = [
        {
            "segments": [
                {"audio": "../clips/clip1.wav", "text": TEXTS[1], "speaker": 1, "train": False},
                {"audio": "../clips/clip0.wav", "text": TEXTS[0], "speaker": 0},
            ]
        },
        {"segments": [{"audio": "../clips/clip1.wav", "text": TEXTS[1], "speaker": 0}]},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return Assets(model, mimi, watermarker, clips, manifest, root / "codes")


def sources(assets: Assets) -> dict:
    """The keywords of `csm.finetune` that point at the test assets, on the CPU."""
    return {
        "model": str(assets.model),
        "mimi": str(assets.mimi),
        "watermarker": str(assets.watermarker),
        "device": "cpu",
        "cache_dir": assets.codes,
    }
