"""A real Ray cluster on loopback, started once per test run, running csm.cluster on tiny weights.

Two engine replicas of a quarter CPU each, with two rows each, and four requests may wait at the
ingress (so that four run at once and the ninth is refused), the ingress and the board, behind Serve's HTTP proxy on
127.0.0.1. The tests call it as users do: with the `openai` client and plain HTTP.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray import serve

import csm
from csm.cluster import app
from tests.product.conftest import assets  # noqa: F401
from tests.server.conftest import free_port

API_KEY = "cluster-test-key"
APP_NAME = "csm"
REPLICAS = 2
WAITING = 4  # Ray counts a request as queued while it is routed: room for a burst of four
STARTUP_SECONDS = 300


@dataclass
class Cluster:
    """The deployed application: its URL, arguments and voices folder; `call` is one raw HTTP request."""

    port: int
    args: dict[str, str]
    voices_dir: Path
    prefix: str = ""  # the application's route prefix on Serve's proxy ("" for "/")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def call(self, method: str, path: str, body: dict | None = None, key: str | None = API_KEY, timeout: float = 120):
        """(status, headers, body) of one request."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, self.prefix + path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def health(self) -> tuple[int, dict]:
        status, _, body = self.call("GET", "/health", key=None)
        return status, json.loads(body)

    def wait_for_replicas(self, count: int, seconds: float = STARTUP_SECONDS) -> dict:
        """Until /health reports `count` ready engine replicas (bounded); its body."""
        deadline = time.monotonic() + seconds
        while True:
            status, body = self.health()
            if status == 200 and body["ready"] == count == len(body["replicas"]):
                return body
            assert time.monotonic() < deadline, f"not {count} ready replicas: {status} {body}"
            time.sleep(0.5)


@pytest.fixture(scope="session")
def cluster(assets, tmp_path_factory):  # noqa: F811
    voices_dir = tmp_path_factory.mktemp("cluster") / "voices"
    args = {
        "model": str(assets.model), "mimi": str(assets.mimi), "watermarker": str(assets.watermarker),
        "device": "cpu", "dtype": "float32", "watermark": "false", "api_key": API_KEY,
        "voices_dir": str(voices_dir), "num_replicas": str(REPLICAS), "max_batch": "2", "max_queue": str(WAITING),
        "replica_cpus": "0.25",
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as environment:
        # Ray's workers inherit these: the csm of this checkout (an absolute path), offline, no usage stats.
        environment.setenv("PYTHONPATH", str(Path(csm.__file__).resolve().parents[1]))
        environment.setenv("HF_HUB_OFFLINE", "1")
        environment.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(app(args), name=APP_NAME, route_prefix="/")
            running = Cluster(port, args, voices_dir)
            running.wait_for_replicas(REPLICAS)
            yield running
        finally:
            serve.shutdown()
            ray.shutdown()
