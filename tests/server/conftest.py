"""Real `csm serve` processes on loopback, on the product's tiny artifacts, one per configuration."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import csm

from tests.product.conftest import assets, generator, mimi, parts, plain_generator, watermarker  # noqa: F401

STARTUP_SECONDS = 180
OWN_KEY = "<the server's own key>"


@dataclass
class Server:
    """A running `csm serve`: its port, process and log; `call` makes one raw HTTP request."""

    port: int
    process: subprocess.Popen
    log: Path
    voices_dir: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def call(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        headers: dict | None = None,
        key: str | None = OWN_KEY,
    ):
        """(status, headers, body) of one request; `key` defaults to the server's own API key."""
        headers = dict(headers or {})
        if isinstance(body, dict):
            body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        key = self.api_key if key == OWN_KEY else key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def engine_stat(self, name: str) -> float:
        """A gauge of the engine's stats() from /metrics."""
        status, _, body = self.call("GET", "/metrics")
        assert status == 200
        for line in body.decode().splitlines():
            if line.startswith(f"csm_engine_{name} "):
                return float(line.split()[1])
        raise AssertionError(f"csm_engine_{name} not in /metrics")

    def wait_idle(self, seconds: float = 120) -> None:
        """Until no engine slot is busy and nothing waits (bounded)."""
        deadline = time.monotonic() + seconds
        while self.engine_stat("active") or self.engine_stat("queue_length"):
            assert time.monotonic() < deadline, "engine still busy"
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    assets,  # noqa: F811
    folder: Path,
    *options: str,
    api_key: str | None = None,
    cwd: Path | None = None,
) -> Server:
    """`csm serve` on a free port, voices in `folder`/voices, run in `cwd` (default: this process's)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / f"server-{port}.log"
    voices_dir = folder / "voices"
    command = [
        sys.executable, "-c", "import sys; from csm.cli import main; sys.exit(main())", "serve",
        "--port", str(port), "--model", str(assets.model), "--mimi", str(assets.mimi),
        "--watermarker", str(assets.watermarker), "--device", "cpu", "--dtype", "float32",
        "--voices-dir", str(voices_dir), *options,
    ]  # fmt: skip
    # The csm that this test imports, wherever the server runs (PYTHONPATH may be relative).
    source = str(Path(csm.__file__).resolve().parents[1])
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": source}
    environment.pop("CSM_API_KEY", None)
    if api_key is not None:
        environment["CSM_API_KEY"] = api_key
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=cwd)
    server = Server(port, process, log, voices_dir, api_key)
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        assert process.poll() is None, f"csm serve exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"csm serve did not start: {log.read_text()}"
        try:
            if server.call("GET", "/health", key=None)[0] == 200:
                return server
        except OSError:
            time.sleep(0.2)


@pytest.fixture(scope="session")
def server(assets, tmp_path_factory):  # noqa: F811
    """Watermark on, no API key, the default slots and queue."""
    running = start_server(assets, tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() in (0, 130), running.log.read_text()
