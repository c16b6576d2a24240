"""The documentation site builds without a warning, and every example in it runs.

`mkdocs build --strict` fails on broken links, missing pages and API references that no longer
resolve. The examples run as doc_blocks.py describes: each page's runnable Python blocks in one
process, in order (later blocks use what earlier ones made), each runnable bash block on its
own, all against tiny random weights under the real hub names (conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from csm.cli import _parser
from tests.package.doc_blocks import CODE_LANGUAGES, REASONS, REPOSITORY, Block, blocks, csm_command_lines, pages

PAGES = {path.name: path for path in pages()}
README = REPOSITORY / "README.md"
EXPECTED_PAGES = {
    "index.md", "getting-started.md", "python.md", "cli.md", "server.md", "cluster.md", "engine.md", "finetune.md",
    "quantization.md", "performance.md", "internals.md", "faq.md", "changelog.md",
}  # fmt: skip


def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "python" / "index.html").read_text().count("load_csm_1b") > 1  # API rendered


def test_the_pages_are_the_planned_ones():
    assert set(PAGES) == EXPECTED_PAGES


def test_the_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 300
    assert "./scripts/test" in README.read_text()


def _all_blocks(paths) -> list[Block]:
    return [block for path in paths for block in blocks(path) if block.language in CODE_LANGUAGES]


@pytest.mark.parametrize("block", _all_blocks([*PAGES.values(), README]), ids=lambda block: block.where)
def test_every_example_compiles_and_its_commands_parse(block: Block):
    """Also for the blocks that do not run: their Python compiles and their `csm` lines parse."""
    if block.needs is not None:
        assert block.needs in REASONS, f"{block.where}: unknown reason {block.needs!r}; known: {REASONS}"
    if block.language == "python":
        compile(block.code, block.where, "exec")
        return
    parser = _parser()
    for arguments in csm_command_lines(block.code):
        try:
            parser.parse_args(arguments)
        except SystemExit as error:
            pytest.fail(f"{block.where}: `csm {' '.join(arguments)}` does not parse (exit {error.code})")


@pytest.mark.parametrize(
    "block",
    [block for path in PAGES.values() for block in blocks(path) if block.language == "json"],
    ids=lambda block: block.where,
)
def test_every_json_example_is_json(block: Block):
    json.loads(block.code)


# The runner: every block of a page exec'd in one namespace, compiled with its page and line, so a
# failure's traceback points into the Markdown file.
_RUNNER = textwrap.dedent("""\
    import json, sys
    namespace = {"__name__": "__main__"}
    for where, line, code in json.load(sys.stdin):
        exec(compile("\\n" * (line - 1) + code, where, "exec"), namespace)
""")

RUNNABLE_PAGES = sorted(
    name for name, path in PAGES.items() if any(block.needs is None for block in _all_blocks([path]))
)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_the_examples_of_a_page_run(page, doc_environment, workspace):
    runnable = [block for block in _all_blocks([PAGES[page]]) if block.needs is None]
    python = [(str(block.path), block.line, block.code) for block in runnable if block.language == "python"]
    if python:
        result = subprocess.run(
            [sys.executable, "-c", _RUNNER],
            input=json.dumps(python),
            cwd=workspace,
            env=doc_environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{page}: {result.stderr[-4000:]}"
    for block in (block for block in runnable if block.language == "bash"):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=workspace,
            env=doc_environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{block.where}: {result.stderr[-4000:]}"
