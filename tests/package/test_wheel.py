"""The wheel, built from a clean checkout of HEAD, installs under its own name and works.

It goes into a fresh virtual environment with `[serve]` (not editable). The environment sees
the system's packages, so torch and the serve extra's dependencies are not downloaded again
(and no CUDA build of torch is pulled); what must come from the wheel is csm itself: the test
checks that `import csm` in the environment is the installed copy, runs `csm --help`, and
serves the web page (whose files the wheel must carry) from that install.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.package.doc_blocks import REPOSITORY
from tests.product.conftest import assets  # noqa: F401
from tests.server.conftest import free_port

DISTRIBUTION = "csm_torch"  # the wheel's file-name form of `csm-torch`
STATIC = ("index.html", "app.js", "style.css")


def _run(*command, **options) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, **options)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPOSITORY / ".git").exists():
        pytest.skip("needs a git checkout to archive HEAD from")
    root = tmp_path_factory.mktemp("wheel")
    checkout = root / "checkout"
    checkout.mkdir()
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", "--format=tar", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive.stdout, check=True)
    # No build isolation: the installed setuptools builds it, so no index is needed.
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(checkout))
    (built,) = (root / "dist").glob("*.whl")
    return built


def test_the_wheel_is_named_and_carries_what_runs(wheel):
    assert wheel.name.startswith(f"{DISTRIBUTION}-0.2.0-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"{DISTRIBUTION}-0.2.0.dist-info/METADATA").decode()
        entry_points = archive.read(f"{DISTRIBUTION}-0.2.0.dist-info/entry_points.txt").decode()
    assert {f"csm/server/static/{name}" for name in STATIC} <= names
    assert "csm/__init__.py" in names and not any(name.startswith(("tests/", "docs/", "benchmarks/")) for name in names)
    assert "Name: csm-torch" in metadata and "Provides-Extra: serve" in metadata
    assert 'Requires-Dist: fastapi>=0.110; extra == "serve"' in metadata
    assert "csm = csm.cli:main" in entry_points


@pytest.fixture(scope="module")
def environment(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    # Without pip of its own: the venv's bundled setuptools would hide the system's newer one,
    # which torch requires; this interpreter's pip installs into it instead.
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    # Offline: every dependency is already there, only the wheel is new.
    install = ("install", "-q", "--no-index", f"{wheel}[serve]")
    _run(sys.executable, "-m", "pip", "--python", str(python), *install, env=_clean_environment())
    return venv


def _clean_environment() -> dict[str, str]:
    """Without this checkout's PYTHONPATH, so that only the installed csm can be imported."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["HF_HUB_OFFLINE"] = "1"
    return environment


def test_the_installed_command_runs(environment, tmp_path):
    where = _run(
        str(environment / "bin" / "python"), "-c",
        "import csm, importlib.metadata as m, json; print(json.dumps([csm.__file__, m.version('csm-torch')]))",
        cwd=tmp_path, env=_clean_environment(),
    )  # fmt: skip
    module, version = json.loads(where.stdout)
    assert Path(module).resolve().is_relative_to(environment.resolve()) and version == "0.2.0"
    help_text = _run(str(environment / "bin" / "csm"), "--help", cwd=tmp_path, env=_clean_environment()).stdout
    assert "serve" in help_text and "say" in help_text


def test_the_installed_server_serves_its_page(environment, assets, tmp_path):  # noqa: F811
    port = free_port()
    log = tmp_path / "serve.log"
    command = [
        str(environment / "bin" / "csm"), "serve", "--port", str(port), "--model", str(assets.model),
        "--mimi", str(assets.mimi), "--watermarker", str(assets.watermarker), "--device", "cpu",
        "--dtype", "float32", "--voices-dir", str(tmp_path / "voices"),
    ]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=_clean_environment(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while _get(port, "/health") is None:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        status, page = _get(port, "/")
        assert status == 200 and b"/static/app.js" in page and b"/static/style.css" in page
        for name in STATIC[1:]:
            status, body = _get(port, f"/static/{name}")
            assert status == 200 and body, name
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def _get(port: int, path: str) -> tuple[int, bytes] | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return None
    finally:
        connection.close()
