"""`import csm` loads the inference stack only, and nothing that exists on Unix alone."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from csm.finetune.trainer import maxrss_mb

SOURCE = Path(__file__).resolve().parents[2] / "src" / "csm"

# Imported by `csm serve`, `csm finetune` or the test oracles, never by `import csm`.
HEAVY = {"fastapi", "starlette", "uvicorn", "pydantic", "av", "prometheus_client", "multipart", "peft", "transformers"}
UNIX_ONLY = {"resource", "fcntl", "termios", "pwd", "grp", "posix", "tty", "pty", "syslog"}


def _imported_after(statement: str) -> tuple[list[str], set[str]]:
    """The csm modules and the top-level packages loaded by a fresh interpreter running `statement`."""
    script = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    modules = json.loads(output.stdout.splitlines()[-1])
    return [name for name in modules if name.split(".")[0] == "csm"], {name.split(".")[0] for name in modules}


def test_import_csm_loads_neither_training_nor_server():
    ours, packages = _imported_after("import csm")
    assert "csm.generator" in ours and "csm.model" in ours  # what it is for
    assert not [name for name in ours if name.startswith(("csm.finetune", "csm.server", "csm.cli", "csm.engine"))]
    assert not packages & HEAVY
    assert "resource" not in packages


def test_csm_finetune_is_loaded_on_first_use():
    ours, _ = _imported_after("import csm; csm.finetune; import csm.adapters")
    assert "csm.finetune" in ours and "csm.finetune.trainer" not in ours  # adapters need no training loop
    ours, _ = _imported_after("import csm; assert callable(csm.finetune.train); csm.finetune.FinetuneOptions")
    assert "csm.finetune.trainer" in ours


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported by a module outside try blocks and functions (what must exist)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(SOURCE.rglob("*.py")), ids=lambda path: str(path.relative_to(SOURCE)))
def test_no_module_needs_a_unix_only_module(path):
    """Windows has none of these: a module may use one only where it exists (inside `try`)."""
    assert not _module_level_imports(path) & UNIX_ONLY


def test_peak_memory_is_read_in_each_systems_unit():
    assert maxrss_mb(2048, "linux") == 2.0  # KiB
    assert maxrss_mb(2 * 2**20, "darwin") == 2.0  # bytes


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
def test_peak_memory_matches_the_kernels_figure():
    import resource

    ru_mb = maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sys.platform)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    hwm_mb = int(status["VmHWM"].split()[0]) / 1024
    assert abs(ru_mb - hwm_mb) <= 0.05 * hwm_mb + 16
