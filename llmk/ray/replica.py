"""A replica of the Ray Serve application: one ``llmk serve`` daemon (its kernel,
engine and HTTP app) inside a Ray actor, reached through the ingress.

- Requests arrive as plain HTTP requests (``forward``) and run through the
  daemon's own app in-process, so routes, validation, errors and streaming are
  those of ``llmk serve``; the answer goes back as its head, then its body chunks.
- Models are Ray Serve multiplexed models: the OpenAI ``model`` is the multiplexed
  model id, a model loads here on first use (the lifecycle manager loads, warms
  and evicts under ``kernel.memory_budget``), and Ray routes the next request for it
  to a replica that holds it. At most ``ray.max_models_per_replica`` stay loaded,
  the least recently used unloaded first.
- Before it takes traffic a replica loads and warms the first models of the
  config (as many as it may hold): Ray routes to it once its constructor returns.
- Fleet commands (``llmk.ray.fleet``): apply a new configuration (hot-swap the
  loaded models that changed, one replica at a time), report models and metrics.
- Ray's health check asks the engines' watchdog: a stalled engine fails it, and
  Ray replaces the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from llmk.logs import get_logger

log = get_logger("llmk.ray")
NOTHING = object()  # ``call_asgi``: no message from the app in time
#: ``call_asgi``: body chunks sent without waiting for the stream interval (chat: role, first token).
EAGER_CHUNKS = 2


class Resident:
    """A model this replica holds, as Ray's multiplexing tracks it: unloaded from the
    kernel when Ray evicts it (``__del__``, which Ray calls on eviction)."""

    def __init__(self, replica: Replica, name: str):
        self.replica, self.name = replica, name

    def __del__(self) -> None:
        replica, self.replica = self.replica, None
        if replica is not None:
            replica.evicted(self.name)


class FleetResponses:
    """A replica's store of Responses API responses: the fleet's, shared by every replica
    (the interface of ``llmk.server.responses.ResponseStore``)."""

    def __init__(self, fleet: Any):
        self.fleet = fleet

    async def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        await self.fleet.response_put.remote(response, conversation)

    async def get(self, ident: str) -> Any:
        return await self.fleet.response_get.remote(ident)

    async def delete(self, ident: str) -> bool:
        return await self.fleet.response_delete.remote(ident)


class Replica:
    """The deployment's class; ``replica_class`` adds the multiplexed loader."""

    def __init__(self, app_name: str, config: dict[str, Any], build: float):
        import ray
        from ray import serve

        from llmk.config import Config
        from llmk.ray.fleet import fleet_actor
        from llmk.server.daemon import Daemon

        self.id = serve.get_replica_context().replica_id.unique_id
        self.fleet = fleet_actor(app_name, config, build)
        self.version, current = ray.get(self.fleet.adopt.remote(config, build))
        self.daemon = Daemon(config=Config.model_validate(current), on_demand=True)
        self.daemon.responses = FleetResponses(self.fleet)
        self._control: asyncio.Task[None] | None = None
        log.info("ray.replica_started", replica=self.id, models=list(self.daemon.config.models))

    async def model(self, name: str) -> Resident:  # replaced by ``replica_class``
        raise NotImplementedError

    # -- start ------------------------------------------------------------------------------------
    async def warm_up(self) -> None:
        """Load the first models of the config, as many as one replica holds (pinned
        ones first), and start listening to the fleet."""
        config = self.daemon.config
        names = sorted(config.models, key=lambda name: not config.models[name].pinned)
        for name in names[:config.ray.max_models_per_replica]:
            try:
                await self.model(name)
            except Exception as error:  # noqa: BLE001 - the others still load; a request shows the error
                log.error("ray.warm_up_failed", replica=self.id, model=name, error=str(error))
        if self._control is None:
            self._control = asyncio.get_running_loop().create_task(self._listen())

    # -- models -----------------------------------------------------------------------------------
    async def load(self, name: str) -> Resident:
        """Load ``name`` (Ray's multiplexing calls this on a miss): what Ray then tracks."""
        await self._load(name)
        return Resident(self, name)

    async def _load(self, name: str) -> None:
        await asyncio.to_thread(self.daemon.load, name, self.daemon.config.models[name])
        log.info("ray.model_loaded", replica=self.id, model=name)

    def evicted(self, name: str) -> None:
        """Ray unloaded ``name`` from this replica (least recently used): free it."""
        with contextlib.suppress(Exception):  # already gone (removed by a reload, evicted for memory)
            self.daemon.kernel.unload(name)
            log.info("ray.model_unloaded", replica=self.id, model=name)

    async def ensure(self, name: str) -> None:
        """``name`` loaded here: through Ray's multiplexing (so that Ray routes to
        this replica), and in the kernel (which may have evicted it for memory)."""
        await self.model(name)
        if name not in self.daemon.kernel.names():
            await self._load(name)  # Ray still tracks its Resident: no new one

    # -- requests ----------------------------------------------------------------------------------
    async def forward(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        """Run one HTTP request through the daemon's app: yield its head
        (``{"status", "headers"}``), then its body in chunks."""
        from ray import serve

        from llmk.server.errors import api_error, error_response

        name = serve.get_multiplexed_model_id()
        if name and name in self.daemon.config.models:
            try:
                await self.ensure(name)
            except Exception as error:  # noqa: BLE001 - the load's error is the answer, as in llmk serve
                response = error_response(api_error(error))
                yield {"status": response.status_code, "headers": list(response.headers.items())}
                yield bytes(response.body)
                return
        interval = self.daemon.config.ray.stream_interval_ms / 1000
        async for part in call_asgi(self.daemon.app, request, interval=interval):
            yield part

    def check_health(self) -> None:
        """Ray's liveness check: fails while an engine is stalled (Ray then replaces the replica)."""
        stalled = [s["name"] for s in self.daemon.kernel.status() if s["current"] and s.get("stalled_since")]
        if stalled:
            raise RuntimeError(f"engine stalled: {', '.join(stalled)}")

    # -- fleet commands ------------------------------------------------------------------------------
    async def _listen(self) -> None:
        member = False
        while True:
            try:
                commands = await self.fleet.poll.remote(self.id)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the fleet actor restarting: try again
                log.warning("ray.fleet_unreachable", replica=self.id, error=str(error))
                await asyncio.sleep(1.0)
                continue
            if not member:  # a change rolled out while this replica started: apply it now
                member = True
                version, config = await self.fleet.get_config.remote()
                if version != self.version:  # its own command: nobody waits for the answer
                    commands.append({"id": None, "op": "apply", "args": {"config": config, "trigger": "joined"}})
            for command in commands:
                asyncio.get_running_loop().create_task(self._run(command))

    async def _run(self, command: dict[str, Any]) -> None:
        from llmk.server.errors import api_error

        try:
            answer = {"ok": True, "result": await getattr(self, f"op_{command['op']}")(**command["args"])}
        except Exception as error:  # noqa: BLE001 - the caller gets it, as llmk serve would answer it
            api = api_error(error)
            answer = {"ok": False, "error": {"status": api.status, "message": api.message, "type": api.type,
                                             "code": api.code, "param": api.param}}
        if command["id"] is not None:
            await self.fleet.reply.remote(self.id, command["id"], answer)
        elif not answer["ok"]:
            log.error("ray.command_failed", replica=self.id, op=command["op"], error=answer["error"]["message"])

    async def op_apply(self, config: dict[str, Any], trigger: str) -> dict[str, Any]:
        """Serve ``config`` from now on: the loaded models that changed hot-swap here
        (the new version loads and warms while the old one serves, then drains)."""
        from llmk.config import Config

        report = await asyncio.to_thread(self.daemon.apply, Config.model_validate(config), trigger)
        return report.as_dict()

    async def op_swap(self, name: str, model: dict[str, Any]) -> dict[str, Any]:
        """Load ``model`` as ``name`` here (hot-swap if it serves): raises what the load raised."""
        from llmk.config import ModelConfig

        await asyncio.to_thread(self.daemon.load, name, ModelConfig.model_validate(model))
        return await self.op_status(name)

    async def op_load(self, name: str) -> dict[str, Any]:
        await self.ensure(name)
        return await self.op_status(name)

    async def op_status(self, name: str | None = None) -> dict[str, Any]:
        from fastapi.encoders import jsonable_encoder

        versions = [s for s in self.daemon.kernel.status() if name is None or s["name"] == name]
        return {"replica": self.id, "pid": os.getpid(), "models": jsonable_encoder(versions)}

    async def op_metrics(self) -> str:
        body, _ = self.daemon.metrics.render()
        return body.decode()

    # -- stop ----------------------------------------------------------------------------------------
    def __del__(self) -> None:
        """Ray stops the replica (scale down, rolling update), after its requests finished."""
        if self._control is not None:
            self._control.cancel()
        with contextlib.suppress(Exception):
            self.fleet.leave.remote(self.id)
        self.daemon.kernel.close(timeout=1.0)


def replica_class(max_models: int) -> type[Replica]:
    """The deployment class, its multiplexed loader holding ``max_models`` models."""
    from ray import serve

    class LlmkReplica(Replica):
        async def __init__(self, app_name: str, config: dict[str, Any], build: float):  # type: ignore[misc]
            await asyncio.to_thread(Replica.__init__, self, app_name, config, build)
            await self.warm_up()

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def model(self, name: str) -> Resident:
            return await self.load(name)

    return LlmkReplica


async def call_asgi(app: Any, request: dict[str, Any], *, interval: float = 0.0) -> AsyncIterator[Any]:
    """Run ``request`` (``method``, ``path``, ``query_string``, ``headers``, ``body``,
    ``client``) through the ASGI ``app``: yield the response's head, then its body.
    The first two body chunks go at once (a chat stream's role, then its first token:
    the time to the first token is not delayed); each later one waits until ``interval``
    seconds have passed since the one before, gathering what the app sends meanwhile (a
    stream's tokens cross the replica, the ingress and Ray's proxy in fewer hops; Ray
    Serve LLM batches its streams the same way), and the end goes at once. Closing
    the generator (the client went away) tells the app the client disconnected."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"],
             "raw_path": request["path"].encode(), "root_path": "", "query_string": request["query_string"].encode(),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
             "client": tuple(request["client"]) if request.get("client") else None, "server": ("llmk-ray", 0)}
    delivered = False
    gone = asyncio.Event()
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def following(deadline: float | None) -> Any:
        """The app's next message if one waits or comes before ``deadline`` (``None``: only
        one already waiting), else ``NOTHING``; ``None`` is the app's end."""
        if not messages.empty():
            return messages.get_nowait()
        if deadline is None:
            return NOTHING
        try:
            return await asyncio.wait_for(messages.get(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return NOTHING

    loop = asyncio.get_running_loop()
    task = loop.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    sent: float | None = None  # when the last body chunk went
    eager = EAGER_CHUNKS  # body chunks still to send at once
    try:
        while True:
            message = await messages.get()
            if message is None:
                task.result()  # the app failed before answering: its error
                return
            if message["type"] == "http.response.start":
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]}
                continue
            chunks, more = [message.get("body", b"")], message.get("more_body", False)
            deadline = sent + interval if interval > 0 and sent is not None and not eager else None
            while more:
                if deadline is not None and loop.time() >= deadline:
                    deadline = None  # the interval is over: what is waiting now, and go
                nxt = await following(deadline)
                if nxt is NOTHING:
                    break
                if nxt is None or nxt["type"] != "http.response.body":
                    messages.put_nowait(nxt)  # the app's end (or not body): the next round sees it
                    break
                chunks.append(nxt.get("body", b""))
                more = nxt.get("more_body", False)
            data = b"".join(chunks)
            if data:
                yield data
                sent, eager = loop.time(), max(0, eager - 1)
            if not more:
                return
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5.0)  # the app sees the disconnect and stops its generations
            task.cancel()
