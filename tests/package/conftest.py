"""A hub cache holding the product's tiny random artifacts under the real repository names.

With `HF_HUB_CACHE` pointing at it and `HF_HUB_OFFLINE=1`, csm's defaults (`load_csm_1b()`,
`Mimi.from_pretrained()`, `csm say ...`) load tiny random weights exactly as they would load
the published ones, so the documentation's examples run unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from csm.mimi.loading import MOSHI_FILE
from tests.factories.hub import populate_hub_cache
from tests.product.conftest import assets, speech_like  # noqa: F401
from csm.audio import save_audio

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def hub_cache(assets, tmp_path_factory) -> Path:  # noqa: F811
    cache = tmp_path_factory.mktemp("hub")
    model_files = {path.relative_to(assets.model).as_posix(): path for path in assets.model.rglob("*") if path.is_file()}
    populate_hub_cache(cache, "sesame/csm-1b", model_files)
    populate_hub_cache(cache, "kyutai/moshiko-pytorch-bf16", {MOSHI_FILE: assets.mimi})
    watermark_files = {
        path.relative_to(assets.watermarker).as_posix(): path for path in assets.watermarker.rglob("*") if path.is_file()
    }
    populate_hub_cache(cache, "sony/silentcipher", watermark_files)
    return cache


@pytest.fixture(scope="session")
def doc_environment(hub_cache, tmp_path_factory) -> dict[str, str]:
    """The environment the examples run in: the tiny hub cache, offline, and a `csm` command
    that runs this checkout's code (whatever csm is installed elsewhere)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "csm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; from csm.cli import main; sys.exit(main())" "$@"\n')
    shim.chmod(0o755)
    environment = {
        **os.environ,
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(REPOSITORY / "src"), str(REPOSITORY)]),
        "TQDM_DISABLE": "1",
        # One thread: tiny models gain nothing from more, and on a shared, busy CPU torch's
        # OpenMP workers wait on each other (frames took 7-10 s instead of ~1 s at load 10).
        "OMP_NUM_THREADS": "1",
    }
    environment.pop("HF_TOKEN", None)
    return environment


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A folder with the recordings the examples name."""
    for index in range(4):
        save_audio(tmp_path / f"utterance_{index}.wav", speech_like(0.4, seed=10 + index), 24_000)
    save_audio(tmp_path / "clip.wav", speech_like(0.4, seed=20), 24_000)
    return tmp_path
