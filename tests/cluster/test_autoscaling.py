"""Autoscaling on the live local cluster: a second application, built by `csm.cluster:app` with
`min_replicas=1, max_replicas=2`, goes from one engine replica to two under load and back to one
once the load ends.

Everything that decides the scaling is the application's own `autoscaling_config` (bounds,
target of three quarters of `max_batch`, the `upscale_delay_s`/`downscale_delay_s` arguments):
with a fixed replica count it would never reach two. Only Ray's sampling of the load, which the
application leaves at Ray's defaults, is made faster here: Ray's handles push their request
counts every 10 s (`metrics_interval_s`) and Serve averages them over 30 s (`look_back_period_s`),
which would make each scaling step take most of a minute.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from ray import serve

from csm.cluster import application
from csm.cluster.application import app
from tests.cluster.conftest import API_KEY, Cluster

APP_NAME = "csm-autoscaling"
PREFIX = "/autoscaling"
FAST_SAMPLING = {"metrics_interval_s": 0.25, "look_back_period_s": 2.0}
ROWS = 2  # per replica: the target is ceil(0.75 * 2) = 2 requests per replica
CLIENTS = 4  # twice the target of one replica: two run, two wait at the ingress
SCALE_SECONDS = 120  # bound on each scaling step (a replica loads in seconds, more on a busy machine)

# Ray warns that metrics_interval_s will become an environment variable.
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")


@pytest.fixture
def scaling(cluster, monkeypatch, tmp_path):
    """The second application (one engine replica, up to two), deleted afterwards."""
    build_engine = application.engine_deployment

    def with_fast_sampling(options):
        deployment = build_engine(options)
        if "autoscaling_config" in deployment:  # none: a fixed count, which this test must catch
            deployment["autoscaling_config"] = {**deployment["autoscaling_config"], **FAST_SAMPLING}
        return deployment

    monkeypatch.setattr(application, "engine_deployment", with_fast_sampling)
    args = {name: value for name, value in cluster.args.items() if name != "num_replicas"}
    args.update(
        min_replicas="1", max_replicas="2", upscale_delay_s="1", downscale_delay_s="2",
        max_batch=str(ROWS), max_queue="8", voices_dir=str(tmp_path / "voices"),
    )  # fmt: skip
    serve.run(app(args), name=APP_NAME, route_prefix=PREFIX)
    try:
        scaled = Cluster(cluster.port, args, tmp_path / "voices", prefix=PREFIX)
        scaled.wait_for_replicas(1)
        yield scaled
    finally:
        serve.delete(APP_NAME)


def _running_engines() -> int:
    """Engine replicas Serve counts as running, from its status API."""
    states = serve.status().applications[APP_NAME].deployments["SpeechEngine"].replica_states
    return sum(count for state, count in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def _engines() -> int:
    """Engine replicas in any state (starting, running, stopping)."""
    return sum(serve.status().applications[APP_NAME].deployments["SpeechEngine"].replica_states.values())


def _wait(condition, what: str, seconds: float = SCALE_SECONDS) -> float:
    """Seconds until `condition()` holds; fails after `seconds`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.25)
    return time.monotonic() - started


def test_load_above_the_target_adds_a_replica_and_its_end_removes_it(scaling):
    assert _running_engines() == _engines() == 1
    client = openai.OpenAI(base_url=f"{scaling.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    stop = threading.Event()
    served: set[str] = set()

    def keep_asking(seed: int) -> int:
        """Requests one after another until told to stop: the load stays at CLIENTS requests."""
        count = 0
        while not stop.is_set():
            response = client.audio.speech.with_raw_response.create(
                model="csm-1b", input="Hello from the cluster.", voice="alloy", response_format="pcm",
                extra_body={"seed": seed * 1000 + count, "max_audio_seconds": 3},
            )  # fmt: skip
            assert response.content
            served.add(response.headers["x-csm-replica"])
            count += 1
        return count

    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = [pool.submit(keep_asking, seed) for seed in range(CLIENTS)]
        try:
            _wait(lambda: _running_engines() == 2, "a second replica under load")
            assert scaling.wait_for_replicas(2, SCALE_SECONDS)["ready"] == 2  # it serves: /health counts it
            _wait(lambda: len(served) >= 2, "requests served by both replicas", 60)
        finally:
            stop.set()
            requests = [future.result(timeout=SCALE_SECONDS) for future in clients]  # each ends its last request
    assert sum(requests) >= CLIENTS
    _wait(lambda: _running_engines() == _engines() == 1, "back to one replica once the load ended")
    assert scaling.wait_for_replicas(1, 30)["ready"] == 1
