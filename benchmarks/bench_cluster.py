"""The cost of the extra hop: the same requests through `csm serve` and through csm.cluster with one replica.

    python benchmarks/bench_cluster.py [--seconds 5] [--concurrency 1,4] [--max-batch 8] [--tiny]

Random weights of CSM-1B's size in bfloat16 (`--tiny`: a tiny CSM in float32, to try it quickly),
a full-size Mimi and random watermark weights of the real size, written once to `--workdir`.
First a `csm serve` process, then a local Ray cluster running `csm.cluster:app` with one engine
replica that may use every core (`replica_cpus` = the core count: Ray sets a replica's OpenMP
threads from it), each on loopback with the same engine settings. For each N, N clients at once
stream one utterance each as raw PCM. Reports, for both and with the cluster's ratio to
`csm serve`:

- requests a minute and mean time to first audio (request sent to first audio bytes);
- `engine s`: the engine's own time to first audio for the last request of the round (from
  being submitted to its first frame: the prompt's prefill and one frame step), from `/metrics`;
- `frame ms`: the engine's speed, as the mean time per frame of audio after the first audio
  (the audio's arrival time over its frames: each frame step of the engine, its share of the
  marking, and per piece of audio (13 frames) one pass through the hop);
- `hop ms`: the pure hop, the median round trip of a request the engine refuses at once (an
  unknown voice: 400), sent alone before the clients: HTTP to `csm serve`'s routes and back,
  or Serve's proxy, the ingress, the engine replica and back, with no model work.

So the cluster's extra time to first audio splits into the hop (`hop ms`, once per request) and
the engine running slower in its replica than in `csm serve`'s process (`engine s`, `frame ms`).
`--worker-niceness 0` starts Ray's workers at normal priority instead of Ray's niceness 15.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm.model import CSMConfig
from tests.factories.csm import random_state_dict, tiny_config
from tests.factories.mimi import write_moshi_checkpoint
from tests.factories.tokenizer import write_tiny_tokenizer
from tests.factories.watermark import write_silentcipher_repo

TEXT = "Hello there, how are you today?"
STARTUP_SECONDS = 900
MIMI_CODES = 2048
FRAME_BYTES = 1920 * 2  # one 80 ms frame of 24 kHz 16-bit PCM
BURST_SECONDS = 0.02  # reads this close to the first belong to the first piece of audio
PROBES = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream(port: int, seconds: float, seed: int) -> tuple[float, float]:
    """Seconds to the first audio byte, and the mean seconds per frame of the audio after the first piece."""
    body = {"model": "csm-1b", "input": TEXT, "voice": "alloy", "response_format": "pcm", "max_audio_seconds": seconds}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    started = time.perf_counter()
    connection.request(
        "POST", "/v1/audio/speech", json.dumps({**body, "seed": seed}), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    first = last = None
    first_piece = received = 0
    while data := response.read1(65536):
        last = time.perf_counter() - started
        first = first or last
        received += len(data)
        if last - first <= BURST_SECONDS:
            first_piece = received
    connection.close()
    frames = (received - first_piece) / FRAME_BYTES
    return first, (last - first) / frames if frames >= 1 else float("nan")


def round_trip(port: int) -> float:
    """Seconds of the median round trip of a request refused without model work (an unknown voice)."""
    body = {"model": "csm-1b", "input": TEXT, "voice": "voice_0123456789abcdef", "response_format": "pcm"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for _ in range(PROBES):
        started = time.perf_counter()
        connection.request("POST", "/v1/audio/speech", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        assert response.status == 400, response.status
        times.append(time.perf_counter() - started)
    connection.close()
    return statistics.median(times)


def engine_first_frame(port: int) -> float:
    """The engine's own time to first audio of its last request (submitted to first frame made:
    the prompt's prefill and one frame), from /metrics (the cluster's: the replica's report)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/metrics")
    lines = connection.getresponse().read().decode().splitlines()
    connection.close()
    (value,) = [line.split()[-1] for line in lines if line.startswith("csm_engine_time_to_first_audio_last_s")]
    return float(value)


def measure(port: int, counts: list[int], seconds: float) -> dict[int, tuple[float, ...]]:
    """{clients: (requests a minute, mean time to first audio, the engine's first frame, mean
    seconds a frame, hop seconds)}, after warming up with one request of the same length (a
    process's first utterances run slower: pages of the weights, the first marked clips)."""
    stream(port, seconds, seed=99)
    round_trip(port)
    figures = {}
    for clients in counts:
        hop = round_trip(port)
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda seed: stream(port, seconds, seed), range(clients)))
        wall = time.perf_counter() - started
        time.sleep(1.5)  # the replica's next report to the board
        figures[clients] = (
            clients / wall * 60,
            statistics.mean(first for first, _ in results),
            engine_first_frame(port),
            statistics.mean(frame for _, frame in results),
            hop,
        )
    return figures


def wait_healthy(port: int, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, "the server exited"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not start")


def through_csm_serve(sources: dict[str, str], max_batch: int, counts: list[int], seconds: float, workdir: Path):
    port = free_port()
    command = [
        sys.executable, "-c", "import sys; from csm.cli import main; sys.exit(main())", "serve", "--port", str(port),
        "--model", sources["model"], "--mimi", sources["mimi"], "--watermarker", sources["watermarker"],
        "--dtype", sources["dtype"], "--device", "cpu", "--max-batch", str(max_batch),
        "--voices-dir", str(workdir / "serve-voices"),
    ]  # fmt: skip
    with open(workdir / "csm-serve.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_environment())
    try:
        wait_healthy(port, process)
        return measure(port, counts, seconds)
    finally:
        process.terminate()
        process.wait(timeout=60)


def through_cluster(
    sources: dict[str, str], max_batch: int, counts: list[int], seconds: float, workdir: Path, niceness: int | None
):
    os.environ.update(_environment())
    if niceness is not None:
        os.environ["RAY_worker_niceness"] = str(niceness)  # read by the raylet that starts the workers
    import ray
    from ray import serve

    from csm.cluster import app

    cores = os.cpu_count() or 1
    args = {
        **sources, "device": "cpu", "num_replicas": "1", "replica_cpus": str(cores), "max_batch": str(max_batch),
        "voices_dir": str(workdir / "cluster-voices"),
    }  # fmt: skip
    ray.init(num_cpus=cores, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(args), name="csm", route_prefix="/")
        wait_healthy(port)
        return measure(port, counts, seconds)
    finally:
        serve.shutdown()
        ray.shutdown()


def _environment() -> dict[str, str]:
    source = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": source, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def write_sources(workdir: Path, tiny: bool) -> dict[str, str]:
    """A model folder (random CSM, tiny tokenizer), Mimi and the watermark weights, written once."""
    config, dtype = (tiny_config(), torch.float32) if tiny else (CSMConfig(), torch.bfloat16)
    model = workdir / ("csm-tiny" if tiny else "csm-1b-random")
    if not (model / "model.safetensors").exists():
        model.mkdir(parents=True, exist_ok=True)
        write_tiny_tokenizer(model / "tokenizer.json")
        (model / "config.json").write_text(json.dumps(config.to_dict()))
        state = random_state_dict(config)
        # Zero heads give the 3 codes past Mimi's 2048 logit 0, far below the top 50: always decodable.
        state["codebook0_head.weight"][MIMI_CODES:] = 0
        state["audio_head"][..., MIMI_CODES:] = 0
        save_file({name: tensor.to(dtype) for name, tensor in state.items()}, model / "model.safetensors")
    mimi = workdir / "mimi.safetensors"
    if not mimi.exists():
        write_moshi_checkpoint(mimi)
    silentcipher = workdir / "silentcipher"
    if not silentcipher.exists():
        write_silentcipher_repo(silentcipher)
    return {
        "model": str(model), "mimi": str(mimi), "watermarker": str(silentcipher),
        "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per utterance (default 5)")
    parser.add_argument("--concurrency", default="1,4", help="client counts (default 1,4)")
    parser.add_argument("--max-batch", type=int, default=8, help="the engine's rows, both ways (default 8)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "csm-bench-cluster")
    parser.add_argument("--tiny", action="store_true", help="a tiny CSM in float32, to try the benchmark quickly")
    parser.add_argument(
        "--worker-niceness", type=int, help="the niceness of Ray's workers (RAY_worker_niceness; Ray's default 15)"
    )
    args = parser.parse_args()
    counts = [int(count) for count in args.concurrency.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    sources = write_sources(args.workdir, args.tiny)
    served = through_csm_serve(sources, args.max_batch, counts, args.seconds, args.workdir)
    clustered = through_cluster(sources, args.max_batch, counts, args.seconds, args.workdir, args.worker_niceness)
    print(
        f"{'tiny CSM, fp32' if args.tiny else 'CSM-1B size, random bf16 weights'}; Mimi and watermark full size; "
        f"{os.cpu_count()} cores; {args.seconds:g} s per utterance, streamed as pcm; one engine replica; "
        f"Ray's workers at niceness {15 if args.worker_niceness is None else args.worker_niceness}"
    )
    print(
        f"{'clients':>7} | {'serve req/min':>13} {'TTFA s':>6} {'engine s':>8} {'frame ms':>8} {'hop ms':>6} | "
        f"{'cluster req/min':>15} {'TTFA s':>6} {'engine s':>8} {'frame ms':>8} {'hop ms':>6} | "
        f"{'TTFA ratio':>10} {'req/min ratio':>13} {'frame ratio':>11}"
    )
    for clients in counts:
        (s_rate, s_first, s_engine, s_frame, s_hop) = served[clients]
        (c_rate, c_first, c_engine, c_frame, c_hop) = clustered[clients]
        print(
            f"{clients:>7} | {s_rate:>13.2f} {s_first:>6.2f} {s_engine:>8.2f} {s_frame * 1000:>8.1f} "
            f"{s_hop * 1000:>6.1f} | {c_rate:>15.2f} {c_first:>6.2f} {c_engine:>8.2f} {c_frame * 1000:>8.1f} "
            f"{c_hop * 1000:>6.1f} | "
            f"{c_first / s_first:>10.2f} {c_rate / s_rate:>13.2f} {c_frame / s_frame:>11.2f}"
        )


if __name__ == "__main__":
    main()
