"""`csm watermark check`: say whether audio files carry the watermark.

By default each file is read at the first cut only, one network pass: a file as csm wrote it
reads there, and the answer comes in seconds. Not finding the mark there proves nothing (an
edited or trimmed file may carry it at another cut), so that answer says it is inconclusive;
`--thorough` searches all 205 cuts, which on a CPU takes minutes per second of unmarked audio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from csm.cli.options import resolve_device, watermark_key

_EXIT_NOT_WATERMARKED = 1
MARKED = "marked"
INCONCLUSIVE = "no mark found at the first cut (inconclusive; --thorough searches every cut)"
NOT_MARKED = "not marked (no cut carries the mark)"


def add_commands(commands) -> None:
    watermark = commands.add_parser("watermark", help="watermark tools")
    # Sub-parsers are of the parent's class (csm's one-line usage errors) unless told otherwise.
    watermark_commands = watermark.add_subparsers(title="commands", required=True, metavar="COMMAND")
    check = watermark_commands.add_parser(
        "check",
        help="say whether audio files carry the watermark",
        description=f"Print 'FILE: {MARKED}' or 'FILE: {INCONCLUSIVE}' for each FILE (with --thorough, "
        f"'FILE: {NOT_MARKED}' instead of the second). Exit status 0 when all are marked, 1 when any is "
        "not, 2 on errors.",
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files (wav, flac, ogg, ...)")
    check.add_argument(
        "--thorough",
        action="store_true",
        help="search every cut (0, 10, ..., 2040 samples) instead of the first: conclusive, but up to 205 "
        "network passes (about 27 minutes for 10 s of unmarked audio on a 2-core CPU), with a progress bar",
    )
    check.add_argument(
        "--watermarker",
        default="sony/silentcipher",
        metavar="SOURCE",
        help="watermark weights: hub repo, folder or file",
    )
    check.add_argument(
        "--watermark-key",
        type=watermark_key,
        default=None,
        metavar="K1,...,K5",
        help="the 5-byte key (default: CSM's public key)",
    )
    check.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    check.set_defaults(run=_check)


def _check(args: argparse.Namespace) -> int:
    from csm.audio import read_audio
    from csm.watermark import CSM_KEY, Watermarker

    watermarker = Watermarker.from_pretrained(args.watermarker, device=resolve_device(args.device))
    key = args.watermark_key or CSM_KEY
    all_marked = True
    for path in args.files:
        audio, sample_rate = read_audio(path)
        if args.thorough:
            marked = _search_every_cut(watermarker, audio, sample_rate, key, path)
        else:
            marked = watermarker.verify(audio, sample_rate, key=key, thorough=False)
        all_marked &= marked
        answer = MARKED if marked else NOT_MARKED if args.thorough else INCONCLUSIVE
        print(f"{path}: {answer}", flush=True)
    return 0 if all_marked else _EXIT_NOT_WATERMARKED


def _search_every_cut(watermarker, audio, sample_rate: int, key, path: Path) -> bool:
    from csm.watermark.watermarker import SHIFTS

    # tqdm's rate over the passes so far gives the estimate of the time left; the search
    # stops early (bar unfinished) at the first cut that reads perfectly.
    with tqdm(
        total=len(SHIFTS),
        desc=f"searching {path}",
        unit="cut",
        file=sys.stderr,
        bar_format="{desc}: {n_fmt}/{total_fmt} cuts |{bar}| {elapsed} elapsed, about {remaining} left",
    ) as bar:
        return watermarker.verify(audio, sample_rate, key=key, thorough=True, progress=bar.update)
