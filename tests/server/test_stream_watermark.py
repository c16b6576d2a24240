"""Streamed audio is marked clip by clip, each clip exactly as a clip of its own would be."""

import itertools

import numpy as np
import torch

from csm.resample import resample
from csm.watermark import CSM_KEY
from csm.watermark.stream import CLIP_SAMPLES, ClipMarker, clip_bounds, watermark_stream
from tests.product.conftest import speech_like
from tests.watermark.test_oracle import _import_original

FRAME = 1920


def _mark(watermarker):
    return lambda clip: watermarker.encode(clip, 24_000, message_sdr=36)


def test_chunks_of_any_size_become_clips_at_fixed_bounds(watermarker):
    audio = speech_like(1.5, seed=4)
    sizes = [FRAME, 3 * FRAME, 7, 20_000, 1]
    cuts = np.cumsum([0, *sizes, audio.numel() - sum(sizes)])
    marker = ClipMarker(_mark(watermarker))
    clips = [clip for start, end in itertools.pairwise(cuts) for clip in marker.push(audio[start:end])]
    clips += marker.finish()
    bounds = clip_bounds(audio.numel())
    assert [clip.numel() for clip in clips] == [end - start for start, end in bounds]
    assert [clip.numel() for clip in clips[:-1]] == [CLIP_SAMPLES] * (len(clips) - 1)
    for clip, (start, end) in zip(clips, bounds):
        assert torch.equal(clip, watermarker.encode(audio[start:end], 24_000))
    assert marker.finish() == []


def test_each_streamed_clip_is_marked_as_the_original_marks_it_alone(assets, watermarker):
    original = _import_original().get_model(
        model_type="44.1k",
        ckpt_path=str(assets.watermarker / "44_1_khz/73999_iteration"),
        config_path=str(assets.watermarker / "44_1_khz/73999_iteration/hparams.yaml"),
        device="cpu",
    )
    audio = speech_like(1.2, seed=5)
    frames = [audio[start : start + FRAME] for start in range(0, audio.numel(), FRAME)]
    clips = list(watermark_stream(frames, _mark(watermarker)))
    assert [clip.numel() for clip in clips] == [CLIP_SAMPLES, audio.numel() - CLIP_SAMPLES]
    for clip, (start, end) in zip(clips, clip_bounds(audio.numel())):
        # CSM's path: to 44.1 kHz, the original's embedding, back to 24 kHz.
        at_44k = resample(audio[start:end], 24_000, 44_100).numpy()
        expected, _ = original.encode_wav(at_44k, 44_100, list(CSM_KEY), message_sdr=36, calc_sdr=False)
        expected = resample(torch.from_numpy(expected), 44_100, 24_000)[: end - start]
        assert (clip - audio[start:end]).abs().max() > 1e-3  # marked
        torch.testing.assert_close(clip, expected, rtol=0, atol=1e-5)


def test_generate_stream_marks_clips_and_joins_to_the_marked_clips(generator):
    request = {"text": "Hello.", "speaker": 0, "context": [], "max_audio_length_ms": 1_120, "seed": 2}
    plain = torch.cat(list(generator.generate_stream(**request, watermark=False)))
    chunks = list(generator.generate_stream(**request))
    assert [chunk.numel() for chunk in chunks] == [CLIP_SAMPLES, FRAME]
    for chunk, (start, end) in zip(chunks, clip_bounds(plain.numel())):
        torch.testing.assert_close(chunk, generator.watermark(plain[start:end]), rtol=0, atol=1e-4)
    # A clip no longer than one watermark clip is marked exactly as generate() marks it.
    short = dict(request, max_audio_length_ms=480)
    streamed = torch.cat(list(generator.generate_stream(**short)))
    torch.testing.assert_close(streamed, generator.generate(**short), rtol=0, atol=1e-4)
