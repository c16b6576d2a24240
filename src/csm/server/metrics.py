"""Prometheus metrics: requests by status, the engines' state, time to first audio, audio served."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily


class Metrics:
    """One registry per app for what the routes count; the engines' figures are read at each scrape."""

    def __init__(self):
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

    def render(self, engines: list[tuple[dict[str, str], dict]]) -> bytes:
        """Prometheus text: the counters, then every engine's `stats()` (labelled per engine)."""
        figures = CollectorRegistry()
        figures.register(_EngineCollector(engines))
        return generate_latest(self.registry) + generate_latest(figures)


class _EngineCollector:
    """Every number in the engines' `stats()` as a gauge `csm_engine_<name>` (queue length, active slots, frames/s, ...)."""

    def __init__(self, engines: list[tuple[dict[str, str], dict]]):
        self._engines = engines

    def collect(self):
        gauges: dict[str, GaugeMetricFamily] = {}
        for labels, stats in self._engines:
            for name, value in stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if name not in gauges:
                        gauges[name] = GaugeMetricFamily(
                            f"csm_engine_{name}", f"engine stats()['{name}']", labels=sorted(labels)
                        )
                    gauges[name].add_metric([labels[key] for key in sorted(labels)], float(value))
        yield from gauges.values()

    def describe(self):
        return []
