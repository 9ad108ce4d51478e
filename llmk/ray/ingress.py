"""The ingress of the Ray Serve application: the HTTP API clients see behind Ray
Serve's proxy, the same as ``llmk serve``'s.

- Model routes (``/v1/...``) are forwarded to a replica, the request's ``model``
  as Ray's multiplexed model id, and answered by the replica's own daemon app.
- Failover: Ray Serve does not retry a request its replica accepted. Here a
  request whose replica died is tried again on another one (up to
  ``ray.max_retries`` times) as long as nothing was sent to the client: every
  non-streaming request (its answer is read whole first) and every stream before
  its first chunk. A stream cut later ends with an error event (and
  ``data: [DONE]``), counted in ``llmk_ray_streams_cut_total``.
- ``/v1/models``, ``/health``, ``/ready`` and ``/metrics`` answer for the fleet;
  ``/metrics`` holds the ingress's counters and each replica's own Prometheus
  text, every sample labelled with its ``replica`` (sum without the label for
  the fleet).
- The management API (same token, routes and checks as ``llmk serve``) changes
  the fleet: a swap or a reload is applied replica by replica, each hot-swapping
  (the new version warms while the old one serves, then drains).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from llmk.logs import get_logger

log = get_logger("llmk.ray")

#: Seconds a replica has to answer a status or metrics query before it is left out.
QUERY_TIMEOUT = 5.0
#: Routes whose JSON body names the model (Ray's multiplexed model id, for routing).
_MODEL_FIELD_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


def _replica_gone() -> tuple[type[BaseException], ...]:
    """Ray's errors for a call whose replica died (or became unreachable) under it."""
    from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError

    return (RayActorError, ActorUnavailableError, WorkerCrashedError)


def requested_model(body: bytes) -> str:
    """The configured model a JSON body asks for (``chat`` for an adapter's ``chat:NAME``:
    the base model's replicas serve its adapters), or "" (the replica then answers the
    bad body)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    model = value.get("model") if isinstance(value, dict) else None
    return model.split(":", 1)[0] if isinstance(model, str) else ""


class Ingress:
    """The ingress deployment (``llmk.ray.build_app`` wraps it with ``serve.ingress``)."""

    def __init__(self, replicas: Any, app_name: str, config: dict[str, Any], build: float,
                 config_path: str | None = None):
        from llmk.config import Config
        from llmk.ray.fleet import fleet_actor

        self.replicas, self.config_path = replicas, config_path
        self.config = Config.model_validate(config)
        self.fleet = fleet_actor(app_name, config, build)
        self.admin_token = os.environ.get(self.config.server.admin_token_env) or None
        self.started = int(time.time())
        self.counters = IngressMetrics()
        #: One fleet-wide change (load, swap, unload, reload) at a time.
        self.changes = asyncio.Lock()

    def __serve_build_asgi_app__(self) -> Any:
        from llmk.ray.app import create_ingress_app

        return create_ingress_app(self)

    # -- the fleet ---------------------------------------------------------------------------------
    async def current_config(self) -> Any:
        from llmk.config import Config

        _, raw = await self.fleet.get_config.remote()
        self.config = Config.model_validate(raw)
        return self.config

    async def members(self) -> list[str]:
        return await self.fleet.alive.remote()

    async def ask_all(self, op: str, **args: Any) -> dict[str, Any]:
        """``op`` on every replica at once; those that do not answer in time are left out."""
        members = await self.members()
        calls = [asyncio.wait_for(self.fleet.call.remote(m, op, args, QUERY_TIMEOUT), QUERY_TIMEOUT + 1)
                 for m in members]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        return {m: a["result"] for m, a in zip(members, answers, strict=True)
                if isinstance(a, dict) and a.get("ok")}

    async def ask(self, member: str, op: str, timeout: float | None = None, **args: Any) -> Any:
        """``op`` on one replica; its error (an ``ApiError`` as ``llmk serve`` answers it) raised here."""
        from llmk.server.errors import ApiError

        timeout = timeout or self.config.kernel.wait_timeout
        answer = await self.fleet.call.remote(member, op, args, timeout)
        if not answer["ok"]:
            error = answer["error"]
            raise ApiError(error["status"], error["message"], error["type"], param=error.get("param"),
                           code=error.get("code"))
        return answer["result"]

    async def roll(self, config: dict[str, Any], trigger: str) -> dict[str, Any]:
        """Serve ``config`` from now on, replica by replica: each one hot-swaps its loaded
        models that changed before the next one starts. Replicas that join later read it
        from the fleet."""
        await self.fleet.set_config.remote(config)
        reports = {}
        for member in await self.members():
            try:
                reports[member] = await self.ask(member, "apply", config=config, trigger=trigger)
            except Exception as error:  # noqa: BLE001 - a replica gone meanwhile: it no longer serves
                reports[member] = {"ok": False, "error": str(error)}
            log.info("ray.replica_updated", replica=member, trigger=trigger)
        await self.current_config()
        return reports

    async def reload(self, trigger: str) -> dict[str, Any]:
        """Read the config file again and roll it out (SIGHUP, a file change, the admin API)."""
        from llmk.config import ConfigError, load_config
        from llmk.server.daemon import keep_restart_only

        async with self.changes:
            if self.config_path is None:
                return {"ok": False, "error": "this application was built without a config file"}
            try:
                new = load_config(self.config_path)
            except ConfigError as error:
                log.error("config.reload_failed", trigger=trigger, error=str(error))
                return {"ok": False, "error": str(error)}
            restart = keep_restart_only(await self.current_config(), new)
            reports = await self.roll(new.model_dump(mode="json", exclude_unset=True), trigger)
            self.admin_token = os.environ.get(new.server.admin_token_env) or None
            log.info("config.reloaded", trigger=trigger, replicas=len(reports), restart_required=restart)
            return {"ok": True, "trigger": trigger, "restart_required": restart, "replicas": reports}

    # -- requests ------------------------------------------------------------------------------------
    async def forward(self, request: Any) -> Any:
        """Answer ``request`` from a replica, trying another one if its replica dies
        before anything was sent to the client."""
        from starlette.responses import Response, StreamingResponse

        from llmk.server.errors import ApiError, error_response

        body = await request.body()
        model = requested_model(body) if request.url.path in _MODEL_FIELD_ROUTES else ""
        payload = {"method": request.method, "path": request.url.path, "query_string": request.url.query,
                   "headers": [(k, v) for k, v in request.headers.items() if k.lower() != "host"],
                   "body": body, "client": list(request.client) if request.client else None}
        gone = _replica_gone()
        for attempt in range(self.config.ray.max_retries + 1):
            stream = self.replicas.options(stream=True, multiplexed_model_id=model).forward.remote(payload)
            try:
                head = await stream.__anext__()
                headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
                if headers.get("content-type", "").startswith("text/event-stream"):
                    first = await anext(stream, b"")  # sent only once the replica has produced it
                    return StreamingResponse(self._relay(first, stream), status_code=head["status"], headers=headers)
                data = b"".join([chunk async for chunk in stream])
                return Response(data, status_code=head["status"], headers=headers)
            except asyncio.CancelledError:  # the client left: the replica stops generating too
                stream.cancel()
                raise
            except gone as error:
                stream.cancel()
                self.counters.failovers.labels("retried" if attempt < self.config.ray.max_retries else "gave_up").inc()
                log.warning("ray.replica_lost", model=model or None, attempt=attempt + 1, error=str(error))
        return error_response(ApiError(503, f"the replicas serving this request died {attempt + 1} times in a row",
                                       "server_error", code="replica_unavailable", headers={"Retry-After": "1"}))

    async def _relay(self, first: bytes, stream: Any) -> AsyncIterator[bytes]:
        """A stream under way: its chunks as they come; an error event if its replica dies."""
        try:
            yield first
            async for chunk in stream:
                yield chunk
        except _replica_gone() as error:
            self.counters.streams_cut.inc()
            log.warning("ray.stream_cut", error=str(error))
            message = {"message": "the replica serving this stream died", "type": "server_error",
                       "code": "replica_unavailable"}
            yield b"data: " + json.dumps({"error": message}).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            stream.cancel()  # a no-op when it ended; the replica stops generating when the client left


class IngressMetrics:
    """The ingress's own counters (the replicas' are theirs, scraped on demand)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry(auto_describe=True)
        self.failovers = Counter("llmk_ray_failovers", "Requests whose replica died before anything was sent, "
                                 "by what followed (retried on another replica, or gave up)", ["outcome"],
                                 registry=self.registry)
        self.streams_cut = Counter("llmk_ray_streams_cut", "Streams ended with an error event: their replica died "
                                   "after the first chunk", registry=self.registry)


def fleet_metrics(ingress_text: bytes, replicas: dict[str, str], members: int) -> bytes:
    """One Prometheus text: the ingress's families, then every replica's with a
    ``replica`` label on each sample (families merged by name), and the replica count."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    for replica, text in replicas.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                               family.unit))
            merged.samples.extend(Sample(s.name, {"replica": replica, **s.labels}, s.value, s.timestamp, s.exemplar)
                                  for s in family.samples)
    count = GaugeMetricFamily("llmk_ray_replicas", "Replicas in the fleet (polling its control plane)")
    count.add_metric([], members)

    class Collected:
        def collect(self) -> Any:
            yield count
            yield from families.values()

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected())  # type: ignore[arg-type]
    return ingress_text + generate_latest(registry)
