"""What the console shows beyond ``kernel.status()``: the recent lifecycle events and
alerts, and a few minutes of history (throughput, latency, memory) for its plots.

``Recorder`` is a kernel plugin (observer hooks only). Its history is sampled when the
state is read, at most once per ``interval``: no thread, and nothing is kept while no
one looks. Rates come from counter deltas between two samples; latencies are those of
the requests that finished in between.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from llmk.hookspecs import hookimpl
from llmk.monitor import RequestRecord, percentile

#: Seconds of history kept, and the shortest gap between two samples.
HISTORY_SECONDS = 600.0
INTERVAL = 1.0
#: Lifecycle events and alerts kept (oldest dropped first).
EVENTS = 100

_SCALARS = (str, int, float, bool, type(None))


class Recorder:
    """Observer of the kernel's lifecycle, alerts and finished requests, for the console."""

    __name__ = "llmk-console"  # its plugin name

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.clock, self.wall = clock, wall
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self.history: deque[dict[str, Any]] = deque()
        self._latencies: list[tuple[float | None, float | None]] = []  # (ttft, tpot) since the last sample
        self._counters: dict[tuple[str, int], tuple[float, float]] = {}  # (name, version) -> (tokens, requests)
        self._last: float | None = None  # clock of the last sample
        self.rates: dict[str, dict[str, float]] = {}  # name -> its rates at the last sample

    # -- kernel hooks ------------------------------------------------------------
    @hookimpl
    def model_state_changed(self, name: str, version: int, state: str, previous: str,
                            detail: dict[str, Any]) -> None:
        plain = {k: v if isinstance(v, _SCALARS) else str(v) for k, v in detail.items()}  # JSON as it is
        self._event({"kind": "state", "model": name, "version": version, "state": state, "previous": previous,
                     "detail": plain})

    @hookimpl
    def model_alert(self, name: str, version: int, alert: dict[str, Any]) -> None:
        self._event({"kind": "alert", "model": name, "version": version, **alert})

    @hookimpl
    def request_finished(self, record: RequestRecord) -> None:
        if record.ttft is None and record.tpot is None:
            return
        with self._lock:
            self._latencies.append((record.ttft, record.tpot))

    def _event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append({"id": next(self._ids), "time": self.wall(), **event})

    # -- history -----------------------------------------------------------------
    def sample(self, status: list[dict[str, Any]], memory: dict[str, Any]) -> None:
        """Add a point from ``kernel.status()`` and ``kernel.metrics()["memory"]``,
        unless the last one is under ``INTERVAL`` old."""
        now = self.clock()
        with self._lock:
            if self._last is not None and now - self._last < INTERVAL:
                return
            seconds = None if self._last is None else now - self._last
            latencies, self._latencies = self._latencies, []
            counters, rates = {}, {}
            for version in status:
                key = (version["name"], version["version"])
                # decode_tokens moves every engine step; tokens_out only when a request ends.
                counters[key] = (version.get("decode_tokens", version.get("tokens_out", 0)),
                                 version.get("requests", 0))
                before = self._counters.get(key, counters[key])
                rate = rates.setdefault(version["name"], {"tokens_per_second": 0.0, "requests_per_second": 0.0})
                if seconds:
                    rate["tokens_per_second"] += max(0, counters[key][0] - before[0]) / seconds
                    rate["requests_per_second"] += max(0, counters[key][1] - before[1]) / seconds
            self._counters, self.rates, self._last = counters, rates, now
            ttfts = [t for t, _ in latencies if t is not None]
            tpots = [t for _, t in latencies if t is not None]
            self.history.append({
                "time": self.wall(),
                "tokens_per_second": round(sum(r["tokens_per_second"] for r in rates.values()), 3),
                "requests_per_second": round(sum(r["requests_per_second"] for r in rates.values()), 3),
                "ttft_p50_seconds": percentile(ttfts, 50), "tpot_p50_seconds": percentile(tpots, 50),
                "memory_used_bytes": memory["used_bytes"], "memory_budget_bytes": memory["budget_bytes"],
            })
            while self.history and self.history[-1]["time"] - self.history[0]["time"] > HISTORY_SECONDS:
                self.history.popleft()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"events": list(self.events), "history": list(self.history),
                    "rates": {name: dict(rate) for name, rate in self.rates.items()}}
