"""``llmk serve``: the kernel, its configuration and the HTTP app, run as a daemon.

- Start: bind (127.0.0.1 unless told otherwise), print where it listens, load
  the configured models in the background (``/ready`` says when they serve).
- Reload (SIGHUP, a change to the config file, ``POST /admin/reload``): read and
  validate the file again, then reconcile: new models load, changed ones
  hot-swap, removed ones drain and unload. A file that does not validate
  changes nothing; the refusal is logged (``config.reload_failed``), printed
  and counted. Settings that need a new process (host, port, cache, plugins)
  are reported as such and keep their running value.
- SIGTERM/SIGINT: stop accepting, let running requests finish for up to
  ``server.shutdown_timeout`` seconds, unload the models, exit.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmk.config import Config, ConfigError, ModelConfig, load_config
from llmk.logs import get_logger
from llmk.server.metrics import Metrics

if TYPE_CHECKING:
    from llmk.handle import ModelHandle

log = get_logger("llmk.server")

#: Settings a running daemon cannot change; a reload that changes them says so.
RESTART_ONLY = {"server": ("host", "port"), "kernel": ("cache_dir",), "plugins": ("disable", "autoload"),
                "ray": ("num_replicas", "autoscaling", "max_models_per_replica", "max_ongoing_requests",
                        "ray_actor_options", "app_name")}


def keep_restart_only(old: Config, new: Config) -> list[str]:
    """The settings of ``RESTART_ONLY`` that ``new`` changes ("server.port", ...), set back
    in ``new`` to what the process runs with."""
    changed = [f"{section}.{key}" for section, keys in RESTART_ONLY.items() for key in keys
               if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)]
    for setting in changed:
        section, key = setting.split(".")
        setattr(getattr(new, section), key, getattr(getattr(old, section), key))
    return changed


def _say(message: str) -> None:
    """Operator-facing lines go to stdout, next to "listening on"."""
    print(f"llmk serve: {message}", flush=True)


@dataclass
class ReloadReport:
    """What a reload did, model by model."""

    trigger: str
    ok: bool = True
    error: str | None = None  # the config was refused: nothing changed
    loaded: list[str] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)  # pinned or keep_alive changed, same version
    unloaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # whatever served before keeps serving
    restart_required: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Daemon:
    """The serving process's state: its kernel, its current config, its metrics."""

    def __init__(self, config_path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                 *, config: Config | None = None, on_demand: bool = False):
        """``config`` (already validated) instead of reading ``config_path``; ``on_demand``:
        configured models load when first asked for (``load``), and a reload swaps only
        those loaded (a Ray replica, ``llmk.ray``), instead of all at start."""
        from llmk.kernel import Kernel
        from llmk.server.app import create_app
        from llmk.server.responses import ResponseStore

        self.config_path = Path(config_path) if config_path is not None else None
        self.overrides = overrides or {}
        self.config = config if config is not None else self._read()
        self.on_demand = on_demand
        self.metrics = Metrics()
        #: Stored Responses API responses (``previous_response_id``); a Ray replica's is the fleet's.
        self.responses = ResponseStore()
        k = self.config.kernel
        self.kernel = Kernel(cache_dir=k.cache_dir, disable=self.config.plugins.disable,
                             autoload=self.config.plugins.autoload, memory_budget=k.memory_budget,
                             drain_timeout=k.drain_timeout, wait_timeout=k.wait_timeout,
                             alerts=[a.rule() for a in k.alerts], max_queue=self.config.server.max_queue,
                             stall_timeout=self.config.server.stall_timeout, plugins=[self.metrics])
        self.metrics.bind(self.kernel)
        self.admin_token = os.environ.get(self.config.server.admin_token_env) or None
        self.failures: dict[str, str] = {}  # configured models whose last load failed
        self.draining = False
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self.app = create_app(self)

    def _read(self) -> Config:
        return load_config(self.config_path, overrides=self.overrides)

    # -- models -------------------------------------------------------------------
    def load(self, name: str, model: ModelConfig) -> ModelHandle:
        """Load ``name`` (or hot-swap it when its spec changed; a no-op when not)."""
        try:
            handle = self.kernel.load(name, pinned=model.pinned, keep_alive=model.keep_alive,
                                      **model.spec().model_dump(exclude_unset=True))
        except Exception as error:
            self.failures[name] = str(error)
            raise
        self.failures.pop(name, None)
        return handle

    def load_configured(self) -> None:
        """Load every configured model; one that fails is reported and the others still load."""
        for name, model in self.config.models.items():
            try:
                self.load(name, model)
                log.info("serve.model_ready", model=name)
            except Exception as error:
                log.error("serve.model_failed", model=name, error=str(error))
                _say(f"model {name!r} failed to load: {error}")

    # -- reload -------------------------------------------------------------------
    def reload(self, trigger: str) -> ReloadReport:
        """Read the config again and reconcile the models with it (one reload at a time)."""
        try:
            new = self._read()
        except ConfigError as error:
            self.metrics.reloads.labels("invalid").inc()
            log.error("config.reload_failed", trigger=trigger, error=str(error))
            _say(f"reload ({trigger}) refused, nothing changed: {error}")
            return ReloadReport(trigger, ok=False, error=str(error))
        return self.apply(new, trigger)

    def apply(self, new: Config, trigger: str) -> ReloadReport:
        """Reconcile the models with ``new``: load the new ones (on demand: later), hot-swap
        the changed ones, unload the removed ones; the settings that need a restart keep
        their running values."""
        with self._reload_lock:
            report = ReloadReport(trigger)
            old, running = self.config, set(self.kernel.names())
            report.restart_required = keep_restart_only(old, new)
            self._apply_settings(new)
            for name in sorted(set(old.models) - set(new.models)):
                if name in running:
                    self.kernel.unload(name)
                    report.unloaded.append(name)
            for name, model in new.models.items():
                before = old.models.get(name)
                if self.on_demand and name not in running:
                    continue  # loads with the new spec when first asked for
                if name in running and before is not None and before.spec() == model.spec():
                    bucket = report.unchanged if before == model else report.updated
                else:
                    bucket = report.swapped if name in running else report.loaded
                try:
                    self.load(name, model)
                    bucket.append(name)
                except Exception as error:
                    report.failed[name] = str(error)
            self.metrics.reloads.labels("partial" if report.failed else "ok").inc()
            log.info("config.reloaded", **report.as_dict())
            changes = {k: v for k, v in report.as_dict().items()
                       if k in ("loaded", "swapped", "updated", "unloaded", "failed", "restart_required") and v}
            _say(f"reloaded ({trigger}): {changes or 'no changes'}")
            return report

    def _apply_settings(self, new: Config) -> None:
        """The settings that take effect without a restart."""
        from llmk.memory import parse_size
        from llmk.monitor import Alerts

        lifecycle = self.kernel.lifecycle
        lifecycle.budget = parse_size(new.kernel.memory_budget)
        lifecycle.drain_timeout, lifecycle.wait_timeout = new.kernel.drain_timeout, new.kernel.wait_timeout
        if new.kernel.alerts != self.config.kernel.alerts:
            lifecycle.alerts = Alerts([a.rule() for a in new.kernel.alerts])
        self.kernel.max_queue = new.server.max_queue  # for versions loaded from now on
        self.admin_token = os.environ.get(new.server.admin_token_env) or None
        self.config = new

    def reload_in_background(self, trigger: str) -> None:
        threading.Thread(target=self.reload, args=(trigger,), name=f"llmk-reload-{trigger}", daemon=True).start()

    def watch(self) -> None:
        """Reload whenever the config file changes (until ``stop``); editors that
        replace the file by renaming are seen too, as the folder is watched."""
        if self.config_path is None or not self.config.server.watch_config:
            return
        import watchfiles

        path = self.config_path.resolve()

        def run() -> None:
            for changes in watchfiles.watch(path.parent, stop_event=self._stop, raise_interrupt=False, recursive=False,
                                            watch_filter=lambda _change, changed: Path(changed) == path):
                if changes:
                    self.reload("file")

        threading.Thread(target=run, name="llmk-config-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def serve(config_path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT, then drain and exit."""
    import socket

    import uvicorn

    daemon = Daemon(config_path, overrides)
    server_config = daemon.config.server
    sock = socket.socket(socket.AF_INET6 if ":" in server_config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((server_config.host, server_config.port))
    sock.listen(2048)  # connections queue from now on, even before uvicorn starts accepting
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not daemon.draining:
                daemon.draining = True  # /ready answers 503 from now on
                grace = daemon.config.server.shutdown_timeout

                def announce() -> None:
                    log.info("serve.draining", signal=signal.Signals(sig).name, timeout=grace)
                    _say(f"draining: waiting up to {grace:g}s for running requests")

                # Not from the handler itself: it may have interrupted this thread in the middle of
                # writing a log line, and the logger's lock is not reentrant.
                threading.Thread(target=announce, name="llmk-serve-drain-notice").start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(daemon.app, log_level="warning", lifespan="off",
                                   timeout_graceful_shutdown=max(1, round(server_config.shutdown_timeout))))
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_in_background("SIGHUP"))
    # uvicorn handles SIGTERM itself, then raises it again into the handler it found: make that
    # one a no-op, so that the models are unloaded below and the daemon exits 0 after a drain.
    signal.signal(signal.SIGTERM, lambda *_: None)
    threading.Thread(target=daemon.load_configured, name="llmk-serve-load", daemon=True).start()
    daemon.watch()
    _say(f"listening on http://{host}:{port} (models: {', '.join(daemon.config.models) or 'none'})")
    try:
        server.run(sockets=[sock])
    finally:
        daemon.stop()
        daemon.kernel.close(timeout=1.0)  # requests had their grace period; free the memory now
        _say("stopped")
    return 0
