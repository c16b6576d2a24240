"""The fenced code blocks of the documentation, and the convention that says which ones run.

A `python` or `bash` block runs in the tests unless its first line is `# needs <reason>` with a
reason from `REASONS`; such a block is still compiled (Python) and its `csm` command lines
still parsed by csm's own parser. Blocks in other languages (json, text, none) are data.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
DOCS = REPOSITORY / "docs"
CODE_LANGUAGES = ("python", "bash")

# What a block may need that the tests do not have; anything else must run.
REASONS = (
    "the real weights",  # the download, or output that only means something with trained weights
    "a running csm serve",
    "the network",
    "minutes to compile",  # torch.compile on a CPU
    "a Ray cluster",  # Ray on several machines, Kubernetes or a GPU: csm.cluster's deployments
)
_MARKER = re.compile(r"#\s*needs\s+(.*?)\s*$")
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPOSITORY)}:{self.line}"

    @property
    def needs(self) -> str | None:
        """The reason this block does not run in the tests, or None when it runs."""
        first = self.code.lstrip("\n").split("\n", 1)[0]
        match = _MARKER.fullmatch(first.strip())
        return match.group(1) if match else None


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order."""
    found, language, start, lines = [], None, 0, []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        fence = _FENCE.match(text)
        if language is None and fence:
            language, start, lines = fence.group(2), number + 1, []
        elif language is not None and fence and not fence.group(2):
            found.append(Block(path, start, language, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(text)
    assert language is None, f"{path}: a code block is not closed"
    return found


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def csm_command_lines(bash: str) -> list[list[str]]:
    """The argument lists of every `csm ...` command in a shell snippet (after pipes, `&&`, `;`)."""
    joined = bash.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "|", "||", "&"):
                if command[:1] == ["csm"]:
                    commands.append(command[1:])
                command = []
            elif command or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):  # not `NAME=value csm ...`
                command.append(token)
    return commands
