"""The engine replicas' latest reports, where the ingress reads them for `/health` and `/metrics`.

A Serve deployment of one replica. Every engine replica reports its `stats()`, its failure (if
its engine's worker died) and its process id every `REPORT_SECONDS`; a replica that has not
reported for `STALE_SECONDS` (killed, or being replaced) is no longer listed.
"""

from __future__ import annotations

import time

REPORT_SECONDS = 0.5
STALE_SECONDS = 3.0


class EngineBoard:
    """Reports by replica id; `live()` holds those fresh enough to count as running."""

    def __init__(self):
        self._reports: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, report: dict) -> None:
        self._reports[replica] = (time.monotonic(), report)

    def live(self) -> dict[str, dict]:
        cutoff = time.monotonic() - STALE_SECONDS
        self._reports = {replica: entry for replica, entry in self._reports.items() if entry[0] >= cutoff}
        return {replica: report for replica, (_, report) in self._reports.items()}
