"""llmk on Ray Serve: the daemon's config served by many replicas, on one machine
or a cluster (``llmk serve --config FILE --ray [ADDRESS]``; docs/SCALING.md).

The application has two deployments and a control actor:

- ``LlmkIngress`` (``ingress.py``, ``app.py``): the HTTP API behind Ray Serve's
  proxy, the same as ``llmk serve``'s; forwards model requests to a replica, the
  ``model`` as Ray's multiplexed model id, and tries another replica when one dies
  before anything was sent;
- ``LlmkReplica`` (``replica.py``): a daemon (kernel, engine, app) per replica,
  models loaded on demand under the memory budget, autoscaled on ongoing requests;
- the fleet (``fleet.py``): a small actor through which the ingress reaches each
  replica (rolling swaps and reloads, models and metrics of every replica).

``build_app(config)`` returns the application for ``serve run``/``serve deploy``;
``serve`` is the command line's ``--ray``. Ray is imported only when called: the
extra ``llmk[ray]`` installs it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmk.logs import get_logger

if TYPE_CHECKING:
    from llmk.config import Config

log = get_logger("llmk.ray")

INSTALL = "pip install 'llmk[ray]'"


def build_app(config: Config | str | Path | dict[str, str] | None = None, *,
              config_path: str | Path | None = None) -> Any:
    """The Ray Serve application of ``config``: a ``Config``, a config file's path,
    ``None`` for the defaults, or Ray's builder arguments (``serve run
    llmk.ray:build_app config=llmk.yaml``). ``config_path`` is the file
    ``/admin/reload`` reads again (given a path, that path). Under ``serve run`` and
    ``serve deploy`` Ray's proxy listens where Ray's HTTP options say, not at the
    config's ``server.host``/``server.port``."""
    from ray import serve

    from llmk.config import Config, load_config
    from llmk.ray.ingress import Ingress
    from llmk.ray.replica import replica_class

    if isinstance(config, dict):  # Ray's application builder arguments
        unknown = set(config) - {"config"}
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}: the one argument is config=FILE")
        config = config.get("config")
    if not isinstance(config, Config):
        config_path = config if config is not None else config_path
        config = load_config(config_path)
    raw = config.model_dump(mode="json", exclude_unset=True)
    settings, build = config.ray, time.time()
    options: dict[str, Any] = {
        "name": "LlmkReplica", "ray_actor_options": settings.ray_actor_options.ray(),
        "max_ongoing_requests": settings.max_ongoing_requests,
        # Ray stops a replica (scale down, update) once its requests finished, or after this.
        "graceful_shutdown_timeout_s": config.server.shutdown_timeout,
    }
    if settings.autoscaling is not None:
        options["autoscaling_config"] = settings.autoscaling.model_dump()
    else:
        options["num_replicas"] = settings.num_replicas or 1
    replicas = serve.deployment(**options)(replica_class(settings.max_models_per_replica))
    # The ingress only relays (its CPU is the proxy's): it reserves none, and takes as
    # many requests as the replicas together.
    # The admin token travels from this process's environment to the ingress's, wherever Ray places it.
    token = os.environ.get(config.server.admin_token_env)
    env = {"runtime_env": {"env_vars": {config.server.admin_token_env: token}}} if token else {}
    ingress = serve.deployment(name="LlmkIngress", num_replicas=1, ray_actor_options={"num_cpus": 0, **env},
                               max_ongoing_requests=100_000)(serve.ingress()(Ingress))
    path = str(config_path) if config_path is not None else None
    return ingress.bind(replicas.bind(settings.app_name, raw, build), settings.app_name, raw, build, path)


def shutdown(app_name: str = "llmk") -> None:
    """Delete the application (its replicas drain first) and its fleet actor."""
    import ray
    from ray import serve

    from llmk.ray.fleet import NAMESPACE, fleet_name

    serve.delete(app_name)
    try:
        ray.kill(ray.get_actor(fleet_name(app_name), namespace=NAMESPACE))
    except ValueError:
        pass  # never created


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve(config_path: str | Path | None, address: str | None,
          overrides: dict[str, dict[str, Any]] | None = None) -> int:
    """``llmk serve --ray [ADDRESS]``: deploy the config on the Ray cluster at ``address``
    (``auto``: the one this machine belongs to; ``None``: a new local one), print where it
    listens, then reload on SIGHUP or a change to the file, and on SIGTERM/SIGINT delete
    the application (requests finish first) and exit."""
    import ray
    from ray import serve as ray_serve

    from llmk.config import load_config
    from llmk.ray.fleet import NAMESPACE

    config = load_config(config_path, overrides=overrides)
    server = config.server
    port = server.port or _free_port(server.host)  # Ray's proxy needs a number
    ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    ray_serve.start(http_options={"host": server.host, "port": port})
    app_name = config.ray.app_name
    print(f"llmk serve: deploying on Ray ({ray.get_runtime_context().gcs_address}): "
          f"{config.ray.num_replicas or 'autoscaled'} replica(s)", flush=True)
    handle = ray_serve.run(build_app(config, config_path=config_path), name=app_name, route_prefix="/")
    print(f"llmk serve: listening on http://{server.host}:{port} (Ray Serve application {app_name!r}, "
          f"models: {', '.join(config.models) or 'none'})", flush=True)

    stop = threading.Event()

    def reload(trigger: str) -> None:
        report = handle.reload.remote(trigger).result()
        print(f"llmk serve: reloaded ({trigger}): {report.get('error') or 'rolled out to every replica'}",
              flush=True)

    def in_background(trigger: str) -> None:
        threading.Thread(target=reload, args=(trigger,), name=f"llmk-reload-{trigger}", daemon=True).start()

    signal.signal(signal.SIGHUP, lambda *_: in_background("SIGHUP"))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if config_path is not None and server.watch_config:
        _watch(Path(config_path), stop, lambda: in_background("file"))
    stop.wait()
    grace = server.shutdown_timeout
    print(f"llmk serve: draining: the replicas finish their requests (up to {grace:g}s)", flush=True)
    # Bounded: a cluster that lost its node (its processes killed with ours) would hang here.
    ending = threading.Thread(target=shutdown, args=(app_name,), name="llmk-ray-shutdown", daemon=True)
    ending.start()
    ending.join(grace + 30)
    ray.shutdown()
    print("llmk serve: stopped", flush=True)
    return 0


def _watch(path: Path, stop: threading.Event, changed: Any) -> None:
    import watchfiles

    path = path.resolve()

    def run() -> None:
        for changes in watchfiles.watch(path.parent, stop_event=stop, raise_interrupt=False, recursive=False,
                                        watch_filter=lambda _change, name: Path(name) == path):
            if changes:
                changed()

    threading.Thread(target=run, name="llmk-config-watch", daemon=True).start()
