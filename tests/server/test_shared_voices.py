"""A voices folder shared by several processes (csm.cluster's replicas): two stores on one folder
see each other's uploads and deletions, when a request names a voice or the voices are listed."""

from __future__ import annotations

import torch

from csm.server.voices import VoiceStore


def _audio(seed: int) -> torch.Tensor:
    return torch.randn(2400, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_a_voice_added_by_one_store_is_found_by_another(tmp_path):
    writer, reader = VoiceStore(tmp_path), VoiceStore(tmp_path)
    voice = writer.add("Ann", "What Ann says.", _audio(1))
    assert len(reader) == 0  # loaded at start: not yet seen
    found = reader.get(voice.id)
    assert found == voice
    assert torch.equal(reader.audio(found), _audio(1))
    other = writer.add("Bo", "What Bo says.", _audio(2))
    assert {entry.id for entry in reader.list()} == {voice.id, other.id}  # listing reads the folder


def test_a_voice_deleted_by_one_store_is_forgotten_by_another_even_when_cached(tmp_path):
    writer, reader = VoiceStore(tmp_path), VoiceStore(tmp_path)
    voice = writer.add("Ann", "What Ann says.", _audio(1))
    reader.audio(reader.get(voice.id))
    assert reader.cached() == 1
    assert writer.delete(voice.id)
    assert reader.get(voice.id) is None and reader.cached() == 0
    assert reader.list() == []
    assert not reader.delete(voice.id)  # already gone


def test_a_store_deletes_a_voice_another_added(tmp_path):
    writer, deleter = VoiceStore(tmp_path), VoiceStore(tmp_path)
    voice = writer.add("Ann", "What Ann says.", _audio(1))
    assert deleter.delete(voice.id)
    assert writer.get(voice.id) is None and not (tmp_path / voice.id).exists()
