"""A bounded load test on loopback: many short requests from a few clients, zero errors, flat memory."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLIENTS = 4
# Enough for the engine to have met its batch shapes (allocator and kernel caches settle), so
# that what is measured after is steady state.
WARM_UP = 32
MAX_REQUESTS = 48
MAX_SECONDS = 90


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_burst_of_requests_has_no_errors_and_leaves_memory_flat(server):
    def one(index: int) -> str | None:
        """None, or what went wrong."""
        formats = ("pcm", "mp3", "wav", "opus")
        request = {
            "model": "csm-1b", "input": f"Request {index}.", "voice": "alloy", "seed": index,
            "response_format": formats[index % len(formats)], "max_audio_seconds": 0.16,
            "stream_format": "sse" if index % 5 == 0 else "audio",
        }  # fmt: skip
        status, _, body = server.call("POST", "/v1/audio/speech", request)
        if status != 200 or not body or b"speech.audio.error" in body:
            return f"request {index}: {status} {body[:200]!r}"
        return None

    with ThreadPoolExecutor(CLIENTS) as pool:
        assert not any(pool.map(one, range(WARM_UP)))
        before = _rss_mb(server.process.pid)
        started = time.monotonic()
        results = []
        # Count- and time-limited: rounds of CLIENTS requests until either limit.
        while len(results) < MAX_REQUESTS and time.monotonic() - started < MAX_SECONDS:
            results += pool.map(one, range(WARM_UP + len(results), WARM_UP + len(results) + CLIENTS))
        wall = time.monotonic() - started
    after = _rss_mb(server.process.pid)
    errors = [result for result in results if result is not None]
    print(f"load: {len(results)} requests in {wall:.1f} s, {len(errors)} errors, RSS {before:.0f} -> {after:.0f} MB")
    assert not errors, errors
    assert len(results) >= 2 * CLIENTS
    assert after - before < 40, f"server memory grew from {before:.0f} to {after:.0f} MB"
