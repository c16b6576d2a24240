"""Data preparation: every broken entry named with its line, skipping, splitting, amortization."""

import json
import math

import pytest
import soundfile
import torch

from csm.audio import save_audio
from csm.finetune.batches import bucket, collate, decoder_frame_count
from csm.finetune.codes import AudioFileCodeCache
from csm.finetune.data import DataError
from csm.finetune.dataset import prepare
from csm.finetune.loss import loss_terms
from csm.finetune.sequences import Example
from csm.mimi import Mimi
from csm.text import load_tokenizer, text_frames
from tests.factories.csm import random_model, tiny_config
from tests.product.conftest import speech_like


@pytest.fixture(scope="module")
def cache(assets):
    return AudioFileCodeCache(Mimi.from_pretrained(assets.mimi), assets.codes)


@pytest.fixture(scope="module")
def tokenizer(assets):
    return load_tokenizer(model_source=assets.model)


@pytest.fixture(scope="module")
def broken_clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    (folder / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    soundfile.write(folder / "nan.wav", [0.1, float("nan"), 0.2] * 100, 24_000, subtype="FLOAT")
    return folder


def segment(audio, **fields):
    return {"audio": str(audio), "text": "Hello there.", "speaker": 0, **fields}


def bad_lines(assets, broken):
    good = assets.clips / "clip0.wav"
    return [
        ("not json", "not valid JSON"),
        (json.dumps({"segments": []}), 'a non-empty list "segments"'),
        (json.dumps({"segments": [segment(broken / "missing.wav")]}), "segment 0: audio file"),
        (json.dumps({"segments": [segment(good, text="  ")]}), 'segment 0: "text" is empty'),
        (json.dumps({"segments": [segment(good), segment(good, speaker=-1)]}), 'segment 1: "speaker" must be'),
        (json.dumps({"segments": [segment(good, speaker="a")]}), '"speaker" must be a non-negative integer'),
        (json.dumps({"segments": [segment(good, train=False)]}), 'every segment has "train": false'),
        (json.dumps({"segments": [segment(broken / "corrupt.wav")]}), "segment 0: cannot read audio file"),
        (json.dumps({"segments": [segment(broken / "nan.wav")]}), "contains NaN or infinite samples"),
    ]


def test_every_broken_entry_fails_with_its_line(assets, broken_clips, cache, tokenizer, tmp_path):
    for number, (line, message) in enumerate(bad_lines(assets, broken_clips), start=2):
        manifest = tmp_path / f"data{number}.jsonl"
        good = json.dumps({"segments": [segment(assets.clips / "clip0.wav")]})
        manifest.write_text(f"{good}\n{line}\n")
        with pytest.raises(DataError) as caught:
            prepare(manifest, cache, tokenizer, 2048)
        assert str(caught.value).startswith(f"{manifest} line 2: "), caught.value
        assert message in str(caught.value)


def test_skip_reports_each_broken_entry_and_keeps_the_rest(assets, broken_clips, cache, tokenizer, tmp_path, capsys):
    lines = [json.dumps({"segments": [segment(assets.clips / "clip0.wav")]})]
    lines += [line for line, _ in bad_lines(assets, broken_clips)]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    prepared = prepare(manifest, cache, tokenizer, 2048, on_error="skip")
    assert [conversation.where for conversation in prepared.conversations] == [f"{manifest} line 1"]
    skipped = capsys.readouterr().err
    for number in range(2, len(lines) + 1):
        assert f"csm: skipped: {manifest} line {number}: " in skipped


def test_a_clip_without_transcript_is_named(assets, cache, tokenizer, tmp_path):
    save_audio(tmp_path / "lonely.wav", speech_like(0.2), 24_000)
    with pytest.raises(DataError, match=r"lonely\.wav: no transcript lonely\.txt beside it"):
        prepare(tmp_path, cache, tokenizer, 2048)


def test_long_conversations_split_at_segments_and_long_segments_are_rejected(assets, cache, tokenizer, tmp_path):
    manifest = tmp_path / "data.jsonl"
    segments = [segment(assets.clips / "clip0.wav", speaker=index % 2) for index in range(3)]
    manifest.write_text(json.dumps({"segments": segments}) + "\n")
    whole = prepare(manifest, cache, tokenizer, 2048).examples
    assert len(whole) == 1
    length = len(whole[0]) // 3
    split = prepare(manifest, cache, tokenizer, 2 * length).examples
    assert [len(example) for example in split] == [2 * length, length]
    with pytest.raises(DataError, match=f"line 1: segment 0 takes {length} positions, more than the model's 10"):
        prepare(manifest, cache, tokenizer, 10)


def test_codes_are_cached_by_content(assets, cache, tmp_path):
    copy = tmp_path / "copy.wav"
    copy.write_bytes((assets.clips / "clip0.wav").read_bytes())
    codes = cache.codes(assets.clips / "clip0.wav")
    assert cache.is_cached(copy)
    assert torch.equal(cache.codes(copy), codes)
    assert codes.shape == (32, math.ceil(0.4 * 24_000 / 1920))


def test_context_segments_are_not_in_the_loss(assets, cache, tokenizer):
    from tests.finetune.conftest import TEXTS

    first = prepare(assets.manifest, cache, tokenizer, 2048).examples[0]  # context (train: false), then trained
    context = len(text_frames(tokenizer, TEXTS[1], 1)[0]) + cache.codes(assets.clips / "clip1.wav").shape[1] + 1
    trained_text = len(text_frames(tokenizer, TEXTS[0], 0)[0])
    expected = torch.zeros(len(first), dtype=torch.bool)
    expected[context + trained_text :] = True  # the trained segment's frames and its end-of-audio frame
    assert torch.equal(first.trained, expected)
    assert first.end_of_audio.nonzero().squeeze(1).tolist() == [len(first) - 1]
    batch = collate([first], ratio=1.0, generator=None)
    assert batch.frames[1].min() == context + trained_text == batch.decoder_frames[1].min()


def example(num_frames: int, ends: int = 1) -> Example:
    length = num_frames + 3
    trained = torch.zeros(length, dtype=torch.bool)
    trained[3:] = True
    end = torch.zeros(length, dtype=torch.bool)
    end[torch.arange(length - 1, length - 1 - ends * 2, -2)] = True
    tokens = torch.randint(2048, (length, 33), generator=torch.Generator().manual_seed(num_frames))
    tokens[:, -1] %= 500  # the tiny text vocabulary
    tokens[end, :-1] = 0
    mask = torch.ones(length, 33, dtype=torch.bool)
    return Example(tokens, mask, trained, end, "test")


@pytest.mark.parametrize(
    "num_frames, ends, ratio", [(1, 1, 1 / 16), (5, 1, 1 / 16), (40, 1, 1 / 16), (40, 3, 0.25), (9, 1, 1.0)]
)
def test_amortization_picks_the_stated_number_with_end_of_audio_and_no_nan(num_frames, ends, ratio):
    examples = [example(num_frames, ends), example(num_frames + 7)]
    batch = collate(examples, ratio, torch.Generator().manual_seed(0))
    rows, positions = batch.decoder_frames
    for row, item in enumerate(examples):
        chosen = positions[rows == row]
        expected = max(1, int(item.end_of_audio.sum()), round(ratio * item.num_frames))
        assert len(chosen) == decoder_frame_count(item.num_frames, int(item.end_of_audio.sum()), ratio) == expected
        assert item.trained[chosen].all()
        assert set(item.end_of_audio.nonzero().squeeze(1).tolist()) <= set(chosen.tolist())
    terms = loss_terms(random_model(tiny_config()), batch)
    assert torch.isfinite(terms.backbone_sum) and torch.isfinite(terms.decoder_sum)


def test_buckets_hold_similar_lengths_within_the_frame_budget():
    lengths = [5, 50, 7, 52, 6, 49, 100]
    groups = bucket(lengths, batch_frames=160, generator=torch.Generator().manual_seed(0))
    assert sorted(index for group in groups for index in group) == list(range(len(lengths)))
    for group in groups:
        assert len(group) * max(lengths[index] for index in group) <= 160 or len(group) == 1
    assert sorted(sorted(lengths[index] for index in group) for group in groups) == [[5, 6, 7], [49, 50, 52], [100]]
