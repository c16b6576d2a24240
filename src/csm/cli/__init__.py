"""The `csm` command: speak text, render a scripted conversation, check watermarks, show setup.

A thin shell over the Python API. Every user error ends as one line on stderr and exit
status 2; `csm watermark check` exits 0 when every file is watermarked and 1 otherwise.
Each module of this package adds one command or a group of related ones.
"""

from __future__ import annotations

import argparse
import sys

import torch

from csm.cli import bench, finetune, info, quantize, serve, speak, watermark
from csm.errors import CSMError

_EXIT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: the process's) and return its exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("csm: interrupted", file=sys.stderr)
        return 130
    except (CSMError, ValueError, OSError, torch.OutOfMemoryError) as error:
        print(f"csm: error: {error}", file=sys.stderr)
        return _EXIT_ERROR


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other csm error."""

    def error(self, message: str):
        self.exit(_EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="csm",
        description="Sesame's CSM-1B text-to-speech in plain PyTorch: 24 kHz speech, watermarked.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND", parser_class=_Parser)
    # In the order `csm --help` lists them.
    for module in (speak, watermark, quantize, finetune, serve, info, bench):
        module.add_commands(commands)
    return parser
