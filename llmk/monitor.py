"""Monitoring: per-model request statistics, the kernel's lifecycle counters,
and threshold alerts.

Everything here is updated from request threads at once, so every mutation
holds a lock. Latencies keep a window of the most recent samples: percentiles
describe the model as it serves now, not since it was loaded.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

WINDOW = 512  # latency samples kept per model and metric

#: What an alert rule can watch; each is computed over the recent window.
AlertMetric = Literal["ttft_p95_seconds", "tpot_p95_seconds", "queue_wait_p95_seconds", "error_rate"]


def percentile(samples: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); ``None`` without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class RequestRecord:
    """One finished request, as the handle measured it."""

    tokens_in: int = 0
    tokens_out: int = 0
    queue_wait: float = 0.0  # seconds before the model started working on it
    ttft: float | None = None  # seconds to the first generated token
    tpot: float | None = None  # seconds per output token after the first
    finish_reason: str | None = None  # stop, length, cancelled, timeout; None for scoring and embedding
    error: bool = False  # the model failed it
    rejected: bool = False  # invalid input (the caller's mistake): counted apart from errors


class RequestStats:
    """Counters and latency windows of one model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.errors = self.rejected = self.tokens_in = self.tokens_out = 0
        self._ttft: deque[float] = deque(maxlen=WINDOW)
        self._tpot: deque[float] = deque(maxlen=WINDOW)
        self._queue: deque[float] = deque(maxlen=WINDOW)
        self._outcomes: deque[bool] = deque(maxlen=WINDOW)  # True: the request failed

    def record(self, r: RequestRecord) -> None:
        with self._lock:
            self.requests += 1
            self.errors += r.error
            self.rejected += r.rejected
            self.tokens_in += r.tokens_in
            self.tokens_out += r.tokens_out
            self._queue.append(r.queue_wait)
            self._outcomes.append(r.error)
            if r.ttft is not None:
                self._ttft.append(r.ttft)
            if r.tpot is not None:
                self._tpot.append(r.tpot)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            ttft, tpot, queue, outcomes = list(self._ttft), list(self._tpot), list(self._queue), list(self._outcomes)
            counts = {"requests": self.requests, "errors": self.errors, "rejected": self.rejected,
                      "tokens_in": self.tokens_in, "tokens_out": self.tokens_out}
        return {
            **counts,
            "error_rate": sum(outcomes) / len(outcomes) if outcomes else 0.0,
            "ttft_p50_seconds": percentile(ttft, 50), "ttft_p95_seconds": percentile(ttft, 95),
            "tpot_p50_seconds": percentile(tpot, 50), "tpot_p95_seconds": percentile(tpot, 95),
            "queue_wait_p50_seconds": percentile(queue, 50), "queue_wait_p95_seconds": percentile(queue, 95),
            "window": len(outcomes),
        }


class LifecycleStats:
    """Kernel-wide lifecycle counters: loads, swaps and rollbacks, evictions, updates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loads: Counter[str] = Counter()  # by result: ok, failed
        self.load_seconds: deque[float] = deque(maxlen=WINDOW)
        self.swaps: Counter[str] = Counter()  # by result: ok, rolled_back
        self.swap_modes: Counter[str] = Counter()  # alongside, replace
        self.evictions: Counter[str] = Counter()  # by reason: memory, expired
        self.updates: Counter[str] = Counter()  # periodic updates by result: swapped, rejected, failed

    def count(self, counter: str, key: str, seconds: float | None = None) -> None:
        with self._lock:
            getattr(self, counter)[key] += 1
            if seconds is not None:
                self.load_seconds.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "loads": dict(self.loads), "load_seconds_p50": percentile(list(self.load_seconds), 50),
                "swaps": dict(self.swaps), "swap_modes": dict(self.swap_modes), "evictions": dict(self.evictions),
                "updates": dict(self.updates),
            }


@dataclass(frozen=True)
class AlertRule:
    """Fire when ``metric`` exceeds ``threshold``, once at least ``min_requests``
    requests are in the window (a single slow first request is not a trend)."""

    metric: AlertMetric
    threshold: float
    min_requests: int = 10


@dataclass
class Alerts:
    """Edge-triggered: a rule fires when its metric crosses above the threshold
    and resolves when it falls back, not on every request in between."""

    rules: list[AlertRule]
    _firing: set[tuple[str, int, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, name: str, version: int, snapshot: dict[str, Any]) -> list[dict[str, Any]]:
        changes = []
        for rule in self.rules:
            value = snapshot.get(rule.metric)
            if value is None or snapshot["window"] < rule.min_requests:
                continue
            key = (name, version, rule.metric)
            with self._lock:
                firing = value > rule.threshold
                if firing == (key in self._firing):
                    continue
                (self._firing.add if firing else self._firing.discard)(key)
            changes.append({"metric": rule.metric, "value": value, "threshold": rule.threshold,
                            "state": "firing" if firing else "resolved"})
        return changes
