"""`csm watermark check`: the first cut by default (seconds), every cut with --thorough.

The networks are the real-shaped random ones of tests/factories/watermark.py; the message
decoder is a stand-in from there where a test needs a mark to be read (random weights read
none), counting its passes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from csm.audio import save_audio
from csm.cli import main
from csm.cli.watermark import INCONCLUSIVE, MARKED, NOT_MARKED
from csm.watermark import Watermarker
from csm.watermark.watermarker import SHIFTS
from tests.factories.watermark import PerfectMessageDecoder, ReadoutMessageDecoder, write_silentcipher_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("silentcipher")
    write_silentcipher_repo(root, seed=1)
    return root


@pytest.fixture(scope="module")
def networks(repo) -> Watermarker:
    return Watermarker.from_pretrained(repo, device="cpu")


def _clip(tmp_path, name: str, seconds: float = 2.5, seed: int = 0):
    """Long enough for two message rows (one row always agrees with itself: a perfect score)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 24_000)) / 24_000
    audio = 0.1 * torch.sin(2 * torch.pi * 220 * t) + 0.03 * torch.randn(t.shape, generator=generator)
    path = tmp_path / name
    save_audio(path, audio, 24_000)
    return path


class MarkAtPass(ReadoutMessageDecoder):
    """Reads nothing until its `at`-th pass, then the CSM key perfectly: a file whose mark sits
    at a later cut (edited or trimmed), which only the full search finds."""

    def __init__(self, at: int) -> None:
        super().__init__(seed=3)
        self.at, self.perfect = at, PerfectMessageDecoder()

    def forward(self, magnitude):
        readout = super().forward(magnitude)
        return self.perfect(magnitude) if self.calls == self.at else readout


def _check(monkeypatch, capsys, networks, decoder, *arguments: str):
    """Run `csm watermark check` in this process with `decoder` as the message decoder."""
    watermarker = Watermarker(networks.encoder, networks.carrier_decoder, lambda: decoder, device="cpu")
    monkeypatch.setattr(Watermarker, "from_pretrained", classmethod(lambda cls, *args, **kwargs: watermarker))
    status = main(["watermark", "check", *arguments, "--device", "cpu"])
    output = capsys.readouterr()
    return status, output.out.splitlines(), output.err


def test_a_marked_file_is_marked_after_one_pass(monkeypatch, capsys, networks, tmp_path):
    clip = _clip(tmp_path, "marked.wav")
    decoder = PerfectMessageDecoder()
    status, lines, _ = _check(monkeypatch, capsys, networks, decoder, str(clip))
    assert (status, lines, decoder.calls) == (0, [f"{clip}: {MARKED}"], 1)


def test_no_mark_at_the_first_cut_is_inconclusive_after_one_pass(monkeypatch, capsys, networks, tmp_path):
    clip = _clip(tmp_path, "plain.wav")
    decoder = MarkAtPass(at=7)  # the mark is there, at a later cut
    status, lines, _ = _check(monkeypatch, capsys, networks, decoder, str(clip))
    assert (status, lines, decoder.calls) == (1, [f"{clip}: {INCONCLUSIVE}"], 1)


def test_thorough_finds_a_mark_at_a_later_cut(monkeypatch, capsys, networks, tmp_path):
    clip = _clip(tmp_path, "trimmed.wav")
    decoder = MarkAtPass(at=7)
    status, lines, progress = _check(monkeypatch, capsys, networks, decoder, str(clip), "--thorough")
    assert (status, lines, decoder.calls) == (0, [f"{clip}: {MARKED}"], 7)  # stops at the perfect reading
    assert "searching" in progress


def test_thorough_reads_every_cut_of_an_unmarked_file_showing_the_time_left(monkeypatch, capsys, networks, tmp_path):
    marked, plain = _clip(tmp_path, "marked.wav"), _clip(tmp_path, "plain.wav", seed=1)
    decoder = MarkAtPass(at=1)  # the first file reads at its first pass; the second never
    status, lines, progress = _check(monkeypatch, capsys, networks, decoder, str(marked), str(plain), "--thorough")
    assert status == 1 and lines == [f"{marked}: {MARKED}", f"{plain}: {NOT_MARKED}"]
    assert decoder.calls == 1 + len(SHIFTS)  # one shift a pass on the CPU
    assert f"{len(SHIFTS)}/{len(SHIFTS)} cuts" in progress and "left" in progress


def test_the_command_reads_one_cut_of_the_real_shaped_networks(repo, tmp_path):
    """No stand-in, a real process: an unmarked file gets the inconclusive answer after one
    pass of the full-size message decoder (the whole search, 205 passes, would take minutes)."""
    clip = _clip(tmp_path, "plain.wav", seconds=3.0, seed=2)
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from csm.cli import main; sys.exit(main())",
         "watermark", "check", str(clip), "--watermarker", str(repo), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [f"{clip}: {INCONCLUSIVE}"]
