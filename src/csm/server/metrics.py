"""Prometheus metrics: requests by status, the engine's state, time to first audio, audio served."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily


class Metrics:
    """One registry per app; `engine_stats` is read at each scrape."""

    def __init__(self, engine_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "csm_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.time_to_first_audio = Histogram(
            "csm_time_to_first_audio_seconds",
            "From a speech request's arrival to its first audio bytes",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.audio_seconds = Counter("csm_audio_seconds", "Seconds of audio sent", registry=self.registry)
        self.registry.register(_EngineCollector(engine_stats))


class _EngineCollector:
    """Every number in the engine's `stats()` as a gauge `csm_engine_<name>` (queue length, active slots, frames/s, ...)."""

    def __init__(self, engine_stats: Callable[[], dict]):
        self._stats = engine_stats

    def collect(self):
        for name, value in self._stats().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauge = GaugeMetricFamily(f"csm_engine_{name}", f"engine stats()['{name}']")
                gauge.add_metric([], float(value))
                yield gauge

    def describe(self):
        return []
