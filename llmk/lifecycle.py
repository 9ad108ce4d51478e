"""The lifecycle manager: what is serving under each name, and every change to it.

A name (``"chat"``) has at most one *current* version. Requests lease the
current version for their whole duration (a stream keeps its lease until it
ends), so a hot-swap cuts over to a new version while calls already running
finish on the old one, which is freed once its last lease is returned.

Transitions of one name are single-flight: concurrent loads of the same spec
share one load (and its failure), requests for a name that is loading wait for
it, and a different spec waits for the transition in flight. Loads compete for
memory and cores, so one runs at a time; each first makes room under the
memory budget (``llmk.memory``) by evicting idle models, or is refused.

The kernel supplies the three steps of a load (``Steps``); this module decides
when they run and keeps the states, events and counters.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llmk.errors import LlmkError, MemoryBudgetError, ModelLoadError, ModelNotFoundError, ModelNotReadyError
from llmk.generation import IDLE_BACKLOG
from llmk.logs import get_logger
from llmk.memory import Resident, choose_victims, process_rss, release_freed_memory
from llmk.monitor import AlertRule, Alerts, LifecycleStats, RequestRecord, RequestStats

if TYPE_CHECKING:
    from llmk.artifact import Artifact
    from llmk.generation import Engine
    from llmk.spec import ModelSpec

log = get_logger("llmk.lifecycle")


class State(enum.StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"


@dataclass(eq=False)
class ModelVersion:
    """One version of a named model, from its load to its unload."""

    name: str
    number: int
    spec: ModelSpec
    pinned: bool = False  # never evicted; only an explicit unload frees it
    keep_alive: float | None = None  # seconds after its last use during which it is not evicted
    state: State = State.LOADING
    backend: str = ""
    device: str = ""
    dtype: str = ""
    artifact: Artifact | None = None
    engine: Engine | None = None
    quality: dict[str, float] | None = None  # the quality gate's measurement, when the spec has one
    memory_estimate: int = 0  # the backend's estimate before loading
    rss_delta: int | None = None  # how much the process grew while it loaded and warmed up (CPU)
    load_seconds: float = 0.0
    loaded_at: float = 0.0  # wall-clock time
    last_used: float = 0.0  # the lifecycle's clock (monotonic), for eviction and keep-alive
    failure: str | None = None
    stalled_since: float | None = None  # wall-clock time of its engine's last progress, while stalled
    stats: RequestStats = field(default_factory=RequestStats)
    plan: Any = field(default=None, repr=False)  # the kernel's build plan, between its steps
    _leases: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def lease(self, now: float) -> None:
        with self._cond:
            self._leases += 1
            self.last_used = now

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
        """What the engine reports holding once loaded (the KV cache at its
        capacity included); the estimate before that."""
        engine = self.engine
        return engine.memory_bytes() if engine is not None else self.memory_estimate

    def budgeted_bytes(self) -> int:
        """What the memory budget counts: the estimate or the report, whichever is
        larger (estimates include the runtime's overhead; see ``Backend.memory_factor``)."""
        return max(self.memory_estimate, self.memory_bytes())

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def status(self, current: bool = True) -> dict[str, Any]:
        engine = self.engine
        backlog = engine.backlog() if engine is not None else dict(IDLE_BACKLOG)
        return {
            "name": self.name,
            "version": self.number,
            "current": current,
            "state": self.state.value,
            "task": self.artifact.task if self.artifact is not None else None,  # generate or embed, once prepared
            "source": self.spec.source,
            "backend": self.backend or self.spec.backend,
            "device": self.device or self.spec.device,
            "dtype": self.dtype or self.spec.dtype,
            "passes": [str(p) for p in self.spec.passes],
            "pinned": self.pinned,
            "keep_alive": self.keep_alive,
            "quality": self.quality,
            "memory_bytes": self.memory_bytes() if self.state in (State.READY, State.DRAINING, State.WARMING) else 0,
            "memory_estimate_bytes": self.memory_estimate,
            "rss_delta_bytes": self.rss_delta,
            "load_seconds": round(self.load_seconds, 3),
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "active_requests": self._leases,
            **backlog,
            **(engine.cache_stats() if engine is not None else {}),
            **(engine.speculation_stats() if engine is not None else {}),
            "failure": self.failure,
            "stalled_since": self.stalled_since,
            "stalled_seconds": round(engine.stalled_for(), 3) if engine is not None else 0.0,
            **self.stats.snapshot(),
        }


class Steps(Protocol):
    """The kernel's part of a load, in the order the manager runs them."""

    def prepare(self, version: ModelVersion) -> int:
        """Build (or find cached) the artifact; return the estimated memory in bytes."""

    def start(self, version: ModelVersion) -> None:
        """Load the artifact into memory (sets ``version.engine``)."""

    def warm_up(self, version: ModelVersion) -> None:
        """Run a real request through the version and check its output."""


class _Transition:
    """A load in flight for one name, which other callers may wait on."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.done = threading.Event()
        self.version: ModelVersion | None = None
        self.error: BaseException | None = None


class Lifecycle:
    """Versions, transitions, leases, memory and monitoring for a kernel's models.

    ``notify(hook, **kwargs)`` reaches the plugins' observer hooks; ``clock``
    (seconds, monotonic) is injectable so policies are tested without sleeping.
    """

    def __init__(self, steps: Steps, *, notify: Callable[..., None], budget: int | None = None,
                 clock: Callable[[], float] = time.monotonic, drain_timeout: float = 60.0,
                 wait_timeout: float = 300.0, alerts: list[AlertRule] = ()):
        self.steps, self.notify, self.budget, self.clock = steps, notify, budget, clock
        self.drain_timeout, self.wait_timeout = drain_timeout, wait_timeout
        self.stats = LifecycleStats()
        self.alerts = Alerts(list(alerts))
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified whenever a name's current version changes
        self._current: dict[str, ModelVersion] = {}
        self._transitions: dict[str, _Transition] = {}
        self._resident: list[ModelVersion] = []  # every version holding (or reserving) memory
        self._loading: set[ModelVersion] = set()
        self._failed: dict[str, ModelVersion] = {}  # the last failed load of a name, until one succeeds
        self._numbers: dict[str, int] = {}
        self._load_lock = threading.Lock()

    # -- queries -------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    def current(self, name: str) -> ModelVersion:
        with self._lock:
            version = self._current.get(name)
            if version is None:
                raise ModelNotFoundError(name, sorted(self._current))
            return version

    def check_known(self, name: str) -> None:
        """Raise ``ModelNotFoundError`` unless ``name`` is serving or loading."""
        with self._lock:
            if name not in self._current and name not in self._transitions:
                raise ModelNotFoundError(name, sorted(self._current))

    def status(self) -> list[dict[str, Any]]:
        """Every version that is loading, serving or draining, by name then number."""
        with self._lock:
            versions = set(self._resident) | self._loading | set(self._current.values()) | set(self._failed.values())
            versions = sorted(versions, key=lambda v: (v.name, v.number))
            current = set(self._current.values())
        return [v.status(v in current) for v in versions]

    def memory(self) -> dict[str, Any]:
        with self._lock:
            used = self._used()
        return {"budget_bytes": self.budget, "used_bytes": used,
                "free_bytes": None if self.budget is None else max(0, self.budget - used)}

    # -- requests ------------------------------------------------------------------
    def acquire(self, name: str, timeout: float | None = None) -> ModelVersion:
        """Lease the current version of ``name``, waiting up to ``timeout``
        (default ``wait_timeout``) while it is loading or being replaced."""
        timeout = self.wait_timeout if timeout is None else timeout
        started = time.monotonic()
        with self._changed:
            while True:
                version = self._current.get(name)
                if version is not None:
                    version.lease(self.clock())
                    return version
                if name not in self._transitions:
                    failed = self._failed.get(name)
                    if failed is not None:
                        raise ModelLoadError(name, failed.failure or "unknown error")
                    raise ModelNotFoundError(name, sorted(self._current))
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise ModelNotReadyError(name, time.monotonic() - started)
                self._changed.wait(min(remaining, 1.0))

    def try_acquire(self, name: str) -> ModelVersion | None:
        """Lease the current version of ``name`` if one is serving, without
        waiting (an event loop must not block); ``None`` otherwise."""
        with self._changed:
            version = self._current.get(name)
            if version is not None:
                version.lease(self.clock())
            return version

    def record(self, version: ModelVersion, record: RequestRecord) -> None:
        """Count a finished request and raise any alert it triggers."""
        version.stats.record(record)
        self.notify("request_finished", name=version.name, version=version.number, record=record)
        if self.alerts.rules:
            for alert in self.alerts.check(version.name, version.number, version.stats.snapshot()):
                log.warning("model.alert", model=version.name, version=version.number, **alert)
                self.notify("model_alert", name=version.name, version=version.number, alert=alert)

    # -- transitions -----------------------------------------------------------------
    def load(self, name: str, spec: ModelSpec, *, pinned: bool = False, keep_alive: float | None = None,
             timeout: float | None = None) -> ModelVersion:
        """Make ``spec`` the current version of ``name`` (a hot-swap if another
        spec serves). Concurrent calls for the same spec share one load."""
        while True:
            with self._lock:
                transition = self._transitions.get(name)
                if transition is None:
                    current = self._current.get(name)
                    if current is not None and current.spec == spec:
                        current.pinned, current.keep_alive = pinned, keep_alive
                        return current
                    transition = self._transitions[name] = _Transition(spec)
                    break
            # Another load of this name is in flight: share it, or wait for it to finish first.
            if not transition.done.wait(self.wait_timeout if timeout is None else timeout):
                raise ModelNotReadyError(name, self.wait_timeout if timeout is None else timeout)
            if transition.spec == spec:
                if transition.error is not None:
                    raise transition.error
                assert transition.version is not None
                return transition.version
        try:
            transition.version = self._transition(name, spec, pinned, keep_alive)
            return transition.version
        except BaseException as error:
            transition.error = error
            raise
        finally:
            with self._changed:
                del self._transitions[name]
                transition.done.set()
                self._changed.notify_all()

    def unload(self, name: str, timeout: float | None = None) -> None:
        """Stop routing requests to ``name``, let running ones finish, free the memory."""
        with self._lock:
            transition = self._transitions.get(name)
        if transition is not None:  # let the load in flight finish first, then unload its result
            transition.done.wait()
        with self._changed:
            version = self._current.pop(name, None)
            self._changed.notify_all()
        if version is None:
            raise ModelNotFoundError(name, self.names())
        self._retire(version, timeout, reason="unload")

    def reap(self) -> list[str]:
        """Unload idle models whose keep-alive has expired; returns their names."""
        now = self.clock()
        with self._lock:
            expired = [v for v in self._current.values()
                       if v.keep_alive is not None and not v.pinned and v.leases == 0 and v.state == State.READY
                       and v.last_used + v.keep_alive <= now]
        for version in expired:
            self._evict(version, "expired")
        return [v.name for v in expired]

    def check_stalls(self, timeout: float) -> list[str]:
        """The watchdog's pass: a serving version whose engine has had work and made
        no progress for over ``timeout`` seconds is reported (the ``model.stalled``
        event, a ``model_alert`` with ``metric="engine_stalled_seconds"``, and its
        status's ``stalled_since``) and the requests waiting on it fail with
        ``EngineStalledError``, on every pass while it stays stalled; when it moves
        again the alert resolves. Returns the names stalled now."""
        with self._lock:
            versions = list(self._current.values())
        stalled = []
        for version in versions:
            engine = version.engine
            seconds = engine.stalled_for() if engine is not None else 0.0
            if seconds > timeout:
                stalled.append(version.name)
                failed = engine.fail_stalled(seconds) if engine is not None else 0
                if version.stalled_since is None:
                    version.stalled_since = time.time() - seconds
                    log.error("model.stalled", model=version.name, version=version.number,
                              seconds=round(seconds, 1), failed_requests=failed)
                    self._stall_alert(version, seconds, timeout, "firing")
            elif seconds == 0.0 and version.stalled_since is not None:
                version.stalled_since = None
                log.warning("model.recovered", model=version.name, version=version.number)
                self._stall_alert(version, 0.0, timeout, "resolved")
        return stalled

    def _stall_alert(self, version: ModelVersion, seconds: float, timeout: float, state: str) -> None:
        alert = {"metric": "engine_stalled_seconds", "value": round(seconds, 1), "threshold": timeout,
                 "state": state}
        self.notify("model_alert", name=version.name, version=version.number, alert=alert)

    def close(self, timeout: float | None = None) -> None:
        for name in self.names():
            self.unload(name, timeout)

    # -- internals ---------------------------------------------------------------------
    def _next_number(self, name: str) -> int:
        with self._lock:
            self._numbers[name] = self._numbers.get(name, 0) + 1
            return self._numbers[name]

    def _set_state(self, version: ModelVersion, state: State, **detail: Any) -> None:
        previous, version.state = version.state, state
        log.info("model.state_changed", model=version.name, version=version.number, state=state.value,
                 previous=previous.value, **detail)
        self.notify("model_state_changed", name=version.name, version=version.number, state=state.value,
                    previous=previous.value, detail=detail)

    def _transition(self, name: str, spec: ModelSpec, pinned: bool, keep_alive: float | None) -> ModelVersion:
        version = ModelVersion(name=name, number=self._next_number(name), spec=spec, pinned=pinned,
                               keep_alive=keep_alive)
        with self._lock:
            old = self._current.get(name)
            self._loading.add(version)
        try:
            return self._load_version(version, old)
        finally:
            with self._lock:
                self._loading.discard(version)

    def _load_version(self, version: ModelVersion, old: ModelVersion | None) -> ModelVersion:
        name, spec = version.name, version.spec
        self.notify("model_load_started", name=name, version=version.number, spec=spec)
        self._set_state(version, State.LOADING, source=spec.source, backend=spec.backend)
        started = time.perf_counter()
        mode = "new" if old is None else "alongside"
        try:
            with self._load_lock:
                version.memory_estimate = self.steps.prepare(version)
                if self._make_room(version, old) == "replace":
                    mode = "replace"
                    self._replace_out(old)
                rss = process_rss()
                self.steps.start(version)
                self._set_state(version, State.WARMING)
                self.steps.warm_up(version)
                if version.device == "cpu":  # after the warm-up: memory-mapped weights are resident by then
                    version.rss_delta = process_rss() - rss
        except Exception as error:
            self._fail(version, old, mode, error)
            if isinstance(error, LlmkError):
                raise
            raise ModelLoadError(name, repr(error)) from error
        version.load_seconds = time.perf_counter() - started
        version.loaded_at, version.last_used = time.time(), self.clock()
        with self._changed:
            self._current[name] = version  # the cut-over: new requests lease the new version from here on
            self._failed.pop(name, None)
            self._changed.notify_all()
        self._set_state(version, State.READY, seconds=round(version.load_seconds, 3), mode=mode,
                        memory_bytes=version.memory_bytes())
        self.stats.count("loads", "ok", version.load_seconds)
        self.notify("model_loaded", name=name, version=version.number, spec=spec, backend=version.backend,
                    device=version.device, seconds=version.load_seconds)
        if old is not None:
            self.stats.count("swaps", "ok")
            self.stats.count("swap_modes", mode)
            log.info("model.swapped", model=name, old_version=old.number, new_version=version.number, mode=mode)
            if mode == "alongside":
                self._retire(old, None, reason="swapped")
        return version

    def _fail(self, version: ModelVersion, old: ModelVersion | None, mode: str, error: Exception) -> None:
        version.failure = str(error)
        with self._lock:
            if version in self._resident:
                self._resident.remove(version)
            if version.name not in self._current:
                self._failed[version.name] = version
        version.close()
        release_freed_memory()
        self._set_state(version, State.FAILED, error=str(error), error_type=type(error).__name__)
        self.stats.count("loads", "failed")
        self.notify("model_load_failed", name=version.name, version=version.number, spec=version.spec, error=error)
        if old is None:
            return
        self.stats.count("swaps", "rolled_back")
        log.warning("model.swap_rolled_back", model=version.name, old_version=old.number,
                    failed_version=version.number, mode=mode, error=str(error))
        if mode == "replace":  # the old version made room for the new one: bring it back
            try:
                self._transition(old.name, old.spec, old.pinned, old.keep_alive)
            except Exception as restore_error:
                log.error("model.restore_failed", model=old.name, error=str(restore_error))

    def _used(self) -> int:
        return sum(v.budgeted_bytes() for v in self._resident)

    def _make_room(self, version: ModelVersion, old: ModelVersion | None) -> str:
        """Reserve ``version``'s estimate, evicting idle models if needed.

        Returns "alongside" when it fits next to the version it replaces (or there
        is none), "replace" when it fits only once that old version is gone.
        """
        needed = version.memory_estimate
        with self._lock:
            if self.budget is None:
                self._resident.append(version)
                return "alongside"
            now = self.clock()
            others = [self._resident_view(v, now) for n, v in self._current.items() if v is not old]
            free = self.budget - self._used()
            victims = choose_victims(needed, free, others, now)
            mode = "alongside"
            if victims is None and old is not None:
                victims = choose_victims(needed, free + old.budgeted_bytes(), others, now)
                mode = "replace"
            if victims is None:
                evictable = sum(r.bytes for r in others if not (r.pinned or r.busy or r.keep_alive_until > now))
                raise MemoryBudgetError(version.name, needed, self.budget, self._used(), evictable)
            chosen = [self._current[r.name] for r in victims]
            for victim in chosen:  # off the routing table under the lock: no new lease can reach them
                del self._current[victim.name]
            self._resident.append(version)
        for victim in chosen:
            self._evict(victim, "memory", routed=False)
        return mode

    def _resident_view(self, version: ModelVersion, now: float) -> Resident:
        keep = version.last_used + version.keep_alive if version.keep_alive is not None else 0.0
        return Resident(name=version.name, bytes=version.budgeted_bytes(), last_used=version.last_used,
                        pinned=version.pinned, busy=version.leases > 0 or version.state != State.READY,
                        keep_alive_until=keep)

    def _replace_out(self, old: ModelVersion) -> None:
        """Drain-and-replace: take the old version off routing (requests now wait
        for the new one) and free it before the new one loads."""
        with self._changed:
            if self._current.get(old.name) is old:
                del self._current[old.name]
        self._retire(old, None, reason="replaced")

    def _evict(self, version: ModelVersion, reason: str, routed: bool = True) -> None:
        if routed:
            with self._changed:
                if self._current.get(version.name) is not version or version.leases:
                    return  # it was swapped or got a request meanwhile
                del self._current[version.name]
        self.stats.count("evictions", reason)
        log.info("model.evicted", model=version.name, version=version.number, reason=reason)
        self._retire(version, None, reason=f"evicted:{reason}")

    def _retire(self, version: ModelVersion, timeout: float | None, reason: str) -> None:
        self._set_state(version, State.DRAINING, reason=reason, active_requests=version.leases)
        if not version.wait_idle(self.drain_timeout if timeout is None else timeout):
            log.warning("model.drain_timeout", model=version.name, version=version.number,
                        active_requests=version.leases)
        self._set_state(version, State.UNLOADING)
        version.close()
        with self._lock:
            if version in self._resident:
                self._resident.remove(version)
        release_freed_memory()
        self._set_state(version, State.UNLOADED)
        self.notify("model_unloaded", name=version.name, version=version.number)
