import os

import pytest
import torch
from huggingface_hub import constants as hub_constants

from csm.errors import CheckpointError, WeightsNotFoundError
from csm.text import audio_frames, load_tokenizer, text_frames
from tests.factories.csm import TINY_TEXT_VOCAB
from tests.factories.hub import populate_hub_cache
from tests.factories.tokenizer import write_tiny_tokenizer

REAL_TOKENIZER = os.environ.get("CSM_TEST_TOKENIZER_JSON")


@pytest.fixture
def tiny_tokenizer_file(tmp_path):
    return write_tiny_tokenizer(tmp_path / "tiny" / "tokenizer.json")


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_every_text_gets_bos_and_eos_around_the_speaker_prefix(tiny_tokenizer_file):
    tokenizer = load_tokenizer(tiny_tokenizer_file)
    encoding = tokenizer.encode("[0]Hello")
    assert encoding.tokens == ["<|begin_of_text|>", "[", "0", "]", "Hello", "<|end_of_text|>"]
    assert encoding.ids[0] == tokenizer.token_to_id("<|begin_of_text|>")
    assert encoding.ids[-1] == tokenizer.token_to_id("<|end_of_text|>")
    assert max(tokenizer.encode("[3]The past is just a story.").ids) < TINY_TEXT_VOCAB


def test_text_frames_fill_only_the_text_slot(tiny_tokenizer_file):
    tokenizer = load_tokenizer(tiny_tokenizer_file)
    tokens, mask = text_frames(tokenizer, "Hello", speaker=1)
    ids = tokenizer.encode("[1]Hello").ids
    assert tokens.shape == mask.shape == (len(ids), 33)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens[:, -1].tolist() == ids
    assert not tokens[:, :-1].any()
    assert mask[:, -1].all() and not mask[:, :-1].any()


def test_audio_frames_end_with_the_all_zero_frame():
    codes = torch.randint(1, 2048, (32, 5), generator=torch.Generator().manual_seed(0))
    tokens, mask = audio_frames(codes)
    assert tokens.shape == mask.shape == (6, 33)
    assert torch.equal(tokens[:5, :32], codes.t())
    assert not tokens[5].any() and not tokens[:, 32].any()
    assert mask[:, :32].all() and not mask[:, 32].any()


@pytest.mark.parametrize("codes", [torch.zeros(31, 4, dtype=torch.long), torch.zeros(32), torch.zeros(32, 4)])
def test_audio_frames_reject_bad_codes(codes):
    with pytest.raises(ValueError, match="audio codes"):
        audio_frames(codes)


KNOWN_IDS = {
    "[0]Hello": [128000, 58, 15, 60, 9906, 128001],
    "[0]This is a test sentence.": [128000, 58, 15, 60, 2028, 374, 264, 1296, 11914, 13, 128001],
}


@pytest.mark.skipif(REAL_TOKENIZER is None, reason="set CSM_TEST_TOKENIZER_JSON to the real Llama-3 tokenizer.json")
def test_known_ids_with_the_real_tokenizer():
    tokenizer = load_tokenizer(REAL_TOKENIZER)
    for text, ids in KNOWN_IDS.items():
        assert tokenizer.encode(text).ids == ids


def test_the_model_folder_tokenizer_comes_first(tmp_path, offline_cache):
    model_dir = tmp_path / "model"
    write_tiny_tokenizer(model_dir / "tokenizer.json")
    (model_dir / "model.safetensors").write_bytes(b"")
    assert load_tokenizer(model_source=model_dir).encode("[0]Hello").tokens[-1] == "<|end_of_text|>"
    assert load_tokenizer(model_source=model_dir / "model.safetensors").get_vocab_size() > 0


def test_falls_back_to_the_ungated_llama_repo(tmp_path, tiny_tokenizer_file, offline_cache):
    populate_hub_cache(offline_cache, "unsloth/Llama-3.2-1B", {"tokenizer.json": tiny_tokenizer_file})
    tokenizer = load_tokenizer(model_source="sesame/csm-1b")
    assert tokenizer.encode("[0]Hello").tokens[0] == "<|begin_of_text|>"


def test_failure_lists_every_source_tried(offline_cache):
    with pytest.raises(WeightsNotFoundError) as caught:
        load_tokenizer(model_source="sesame/csm-1b")
    message = str(caught.value)
    for source in ("sesame/csm-1b", "unsloth/Llama-3.2-1B", "meta-llama/Llama-3.2-1B", "HF_TOKEN"):
        assert source in message


def test_a_tokenizer_without_llama3_specials_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.BPE()).save(str(path))
    with pytest.raises(CheckpointError, match="begin_of_text"):
        load_tokenizer(path)
    path.write_text("not json")
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json"):
        load_tokenizer(path)
