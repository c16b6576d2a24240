"""`csm serve` under concurrent streaming clients, against the engine called directly.

    python benchmarks/bench_server.py [--seconds 5] [--concurrency 1,4,8] [--tiny]

Random weights of CSM-1B's size in bfloat16, a full-size Mimi and random watermark weights of
the real size (random weights never sample the end of speech, so every utterance runs to
`--seconds`). The server runs in this process on loopback with a real uvicorn, and N clients
each stream one utterance as raw PCM at once. Reports, per N:
- through the server: requests per minute, mean time to first byte, wall time;
- the engine directly (same requests, same engine, no HTTP, no watermark): requests per
  minute and mean time to first audio, so the difference is the server's overhead plus the
  watermark;
- the watermark on streamed responses: the same server run with the watermark off at N = 1,
  and the time to mark one 1.04 s clip.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import random_csm

from csm import Generator, Mimi
from csm.engine import Engine, Request
from csm.model import CSMConfig
from csm.server.app import create_app
from csm.server.backend import LocalBackend
from csm.server.speech import SpeechService
from csm.server.voices import Voices, VoiceStore
from csm.text import load_tokenizer
from csm.threads import run_in_fresh_thread
from csm.watermark import Watermarker
from csm.watermark.stream import CLIP_SAMPLES
from tests.factories.csm import tiny_config
from tests.factories.mimi import write_moshi_checkpoint
from tests.factories.tokenizer import write_tiny_tokenizer
from tests.factories.watermark import write_silentcipher_repo

TEXT = "Hello there, how are you today?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackServer:
    """The app on a uvicorn in a thread of this process."""

    def __init__(self, service: SpeechService):
        self.port = free_port()
        config = uvicorn.Config(create_app(LocalBackend(service)), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join()

    def stream(self, seconds: float, seed: int) -> tuple[float, float]:
        """Seconds to the first byte and to the last of one streamed utterance."""
        body = {
            "model": "csm-1b",
            "input": TEXT,
            "voice": "alloy",
            "response_format": "pcm",
            "max_audio_seconds": seconds,
            "seed": seed,
        }
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        started = time.perf_counter()
        connection.request("POST", "/v1/audio/speech", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        first = None
        while response.read1(65536):
            first = first or time.perf_counter() - started
        connection.close()
        return first, time.perf_counter() - started


def through_server(server: LoopbackServer, clients: int, seconds: float) -> tuple[float, list[float]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda seed: server.stream(seconds, seed), range(clients)))
    return time.perf_counter() - started, [first for first, _ in results]


def through_engine(engine: Engine, clients: int, seconds: float) -> tuple[float, list[float]]:
    def one(seed: int) -> float:
        started = time.perf_counter()
        first = None
        for _ in engine.submit(Request(TEXT, 0, (), seconds * 1000, seed=seed)):
            first = first or time.perf_counter() - started
        return first

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        firsts = list(pool.map(one, range(clients)))
    return time.perf_counter() - started, firsts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per utterance (default 5)")
    parser.add_argument("--concurrency", default="1,4,8", help="client counts (default 1,4,8)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "csm-bench-server")
    parser.add_argument("--tiny", action="store_true", help="a tiny CSM in float32, to try the benchmark quickly")
    args = parser.parse_args()
    counts = [int(count) for count in args.concurrency.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    mimi_file = args.workdir / "mimi.safetensors"
    if not mimi_file.exists():
        write_moshi_checkpoint(mimi_file)
    silentcipher = args.workdir / "silentcipher"
    if not silentcipher.exists():
        write_silentcipher_repo(silentcipher)
    tokenizer = load_tokenizer(write_tiny_tokenizer(args.workdir / "tokenizer.json"))
    config, dtype = (tiny_config(), torch.float32) if args.tiny else (CSMConfig(), torch.bfloat16)

    def load() -> Generator:  # on a thread that ends, as `csm serve` loads (see csm.threads)
        model = random_csm(config, dtype)
        return Generator(
            model, Mimi.from_pretrained(mimi_file), tokenizer, Watermarker.from_pretrained(silentcipher, device="cpu")
        )

    def time_one_mark() -> float:
        clip = torch.randn(CLIP_SAMPLES) * 0.1
        generator.watermark(clip)
        started = time.perf_counter()
        generator.watermark(clip)
        return time.perf_counter() - started

    generator = run_in_fresh_thread(load)
    voices = Voices({}, VoiceStore(args.workdir / "voices"))
    mark_seconds = run_in_fresh_thread(time_one_mark)
    print(
        f"{'tiny CSM, fp32' if args.tiny else 'CSM-1B size, random bf16 weights'}; Mimi and watermark full size fp32; {torch.get_num_threads()} CPU threads; "
        f"{args.seconds:g} s per utterance, streamed as pcm"
    )
    print(
        f"{'clients':>7} | {'server req/min':>14} {'TTFB s':>7} {'wall s':>7} | {'engine req/min':>14} {'TTFA s':>7} {'wall s':>7} | {'overhead':>8}"
    )
    with Engine(generator, max_batch=max(counts), max_queue=64) as engine:
        marked = SpeechService(engine, generator, voices, generator.watermark)
        plain = SpeechService(engine, generator, voices, None)
        through_engine(engine, 1, 0.16)  # warm-up
        with LoopbackServer(marked) as server:
            for clients in counts:
                wall, firsts = through_server(server, clients, args.seconds)
                engine_wall, engine_firsts = through_engine(engine, clients, args.seconds)
                print(
                    f"{clients:>7} | {clients / wall * 60:>14.2f} {statistics.mean(firsts):>7.2f} {wall:>7.1f} | "
                    f"{clients / engine_wall * 60:>14.2f} {statistics.mean(engine_firsts):>7.2f} {engine_wall:>7.1f} | "
                    f"{wall / engine_wall - 1:>+8.1%}"
                )
        with LoopbackServer(plain) as server:
            wall, firsts = through_server(server, 1, args.seconds)
    print(
        f"watermark on streamed responses, 1 client: time to first byte {firsts[0]:.2f} s without it; "
        f"marking one {CLIP_SAMPLES / 24_000:.2f} s clip takes {mark_seconds:.2f} s; wall {wall:.1f} s without it"
    )


if __name__ == "__main__":
    main()
