"""`csm watermark check`: say whether audio files carry the watermark."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from csm.cli.options import resolve_device, watermark_key

_EXIT_NOT_WATERMARKED = 1


def add_commands(commands) -> None:
    watermark = commands.add_parser("watermark", help="watermark tools")
    # Sub-parsers are of the parent's class (csm's one-line usage errors) unless told otherwise.
    watermark_commands = watermark.add_subparsers(title="commands", required=True, metavar="COMMAND")
    check = watermark_commands.add_parser(
        "check",
        help="say whether audio files carry the watermark",
        description="Print 'Watermarked' or 'Not watermarked' for each FILE. "
        "Exit status 0 when all are watermarked, 1 when any is not, 2 on errors.",
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files (wav, flac, ogg, ...)")
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
    from csm.watermark.watermarker import SHIFTS

    watermarker = Watermarker.from_pretrained(args.watermarker, device=resolve_device(args.device))
    key = args.watermark_key or CSM_KEY
    all_marked = True
    for path in args.files:
        audio, sample_rate = read_audio(path)
        # Unmarked audio is read at every cut (minutes per second of audio on a CPU): show it.
        with tqdm(total=len(SHIFTS), desc=f"checking {path}", unit="cut", leave=False, file=sys.stderr) as bar:
            marked = watermarker.verify(audio, sample_rate, key=key, progress=bar.update)
        all_marked &= marked
        print(f"{'Watermarked' if marked else 'Not watermarked'}: {path}")
    return 0 if all_marked else _EXIT_NOT_WATERMARKED
