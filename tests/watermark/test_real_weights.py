"""Round trip with the published weights: runs when CSM_WATERMARK_WEIGHTS names a local copy
of `sony/silentcipher` (the repo root or its `44_1_khz/73999_iteration` folder)."""

import os

import pytest
import torch

from csm.watermark import CSM_KEY, Watermarker

WEIGHTS = os.environ.get("CSM_WATERMARK_WEIGHTS")

pytestmark = pytest.mark.skipif(
    not WEIGHTS, reason="set CSM_WATERMARK_WEIGHTS to a local copy of the sony/silentcipher weights"
)


def _speech_like(seconds: float, seed: int) -> torch.Tensor:
    # voiced harmonics with a wandering pitch and syllable-like bursts, plus breath noise
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 24_000)) / 24_000
    pitch = 140 + 30 * torch.sin(2 * torch.pi * 0.7 * t)
    phase = 2 * torch.pi * torch.cumsum(pitch, 0) / 24_000
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t).clamp(min=0)
    return 0.1 * voiced * envelope + 0.005 * torch.randn(t.shape, generator=generator)


def test_marked_audio_verifies_and_clean_audio_does_not():
    wm = Watermarker.from_pretrained(WEIGHTS, device="cpu")
    clean = _speech_like(3.0, seed=0)
    marked = wm.encode(clean, 24_000)
    result = wm.decode(marked, 24_000)
    assert result["status"] and result["messages"] == [list(CSM_KEY)]
    assert wm.verify(marked, 24_000)
    assert not wm.verify(marked, 24_000, key=[1, 2, 3, 4, 5])
    # about 1 s: a single message row, so the search ends at the first shift
    assert not wm.verify(_speech_like(1.0, seed=1), 24_000)
