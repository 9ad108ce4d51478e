"""Model versions and their states: the part of the kernel that knows what is
serving, who is using it, and when it may be freed.

A name (``"chat"``) has at most one *current* version; requests lease the
current version for their whole duration (a stream keeps its lease until it
ends), so a hot-swap can cut over to a new version while calls already running
finish on the old one, which is freed only once its last lease is returned.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmk.artifact import Artifact
    from llmk.generation import Engine
    from llmk.spec import ModelSpec


class State(enum.StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass
class ModelVersion:
    """One loaded version of a named model."""

    name: str
    number: int
    spec: ModelSpec
    state: State = State.LOADING
    backend: str = ""
    device: str = ""
    dtype: str = ""
    artifact: Artifact | None = None
    engine: Engine | None = None
    quality: dict[str, float] | None = None  # the quality gate's measurement, when the spec has one
    load_seconds: float = 0.0
    loaded_at: float = 0.0
    last_used: float = 0.0
    counters: Counters = field(default_factory=Counters)
    _leases: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def lease(self) -> None:
        with self._cond:
            self._leases += 1
            self.last_used = time.time()

    def release(self) -> None:
        with self._cond:
            self._leases -= 1
            self._cond.notify_all()

    @property
    def leases(self) -> int:
        return self._leases

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until no request holds this version; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._leases == 0, timeout)

    def memory_bytes(self) -> int:
        return self.engine.runner.memory_bytes() if self.engine else 0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.runner.close()
            self.engine = None

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.number,
            "state": self.state.value,
            "source": self.spec.source,
            "backend": self.backend or self.spec.backend,
            "device": self.device or self.spec.device,
            "dtype": self.dtype or self.spec.dtype,
            "passes": [str(p) for p in self.spec.passes],
            "quality": self.quality,
            "memory_bytes": self.memory_bytes(),
            "load_seconds": round(self.load_seconds, 3),
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "active_requests": self._leases,
            "requests": self.counters.requests,
            "errors": self.counters.errors,
            "tokens_in": self.counters.tokens_in,
            "tokens_out": self.counters.tokens_out,
        }
