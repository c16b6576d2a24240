"""scripts/gpu-check on the CPU: its dry run names only tests, markers and tools that exist,
and its steps fit the 10 minutes it promises."""

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"


def load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def test_the_dry_run_lists_every_step_and_finds_every_name_it_uses():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no missing test file, marker or tool
    lines = done.stdout.splitlines()
    assert any("pip install" in line and "torch==2.13.0" in line for line in lines)
    tests = next(line for line in lines if line.startswith("[tests"))
    gpu_check = load_script()
    assert "-m gpu" in tests and all(path in tests for path in gpu_check.GPU_TESTS)
    bench = [line for line in lines if line.startswith("[bench")]
    assert "--quantize bf16,int8,int4 " in bench[0] and "--quantize bf16 --compile " in bench[1]
    assert all("--device cuda" in line for line in bench)


def test_the_steps_fit_in_ten_minutes():
    gpu_check = load_script()
    planned = gpu_check.steps(sys.executable, Path("/tmp/work"), 16, install=True)
    assert sum(gpu_check.TIMEOUTS[name] for name, _ in planned) <= 600
    assert [name for name, _ in gpu_check.steps(sys.executable, Path("/tmp/work"), 16, install=False)] == [
        "tests",
        "assets",
        "bench",
        "bench compiled",
    ]


def test_every_test_it_runs_is_collected_under_the_gpu_marker():
    """pytest itself selects them: each file holds at least one test marked gpu."""
    gpu_check = load_script()
    root = SCRIPT.parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *gpu_check.GPU_TESTS],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": f"{root / 'src'}:{root}", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    for path in gpu_check.GPU_TESTS:
        assert any(line.startswith(path) for line in collected), path
