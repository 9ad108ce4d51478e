"""The ingress's HTTP app (FastAPI): what a client of ``llmk serve --ray`` talks to.
The same routes, error bodies, body limits and management API as ``llmk serve``
(``llmk.server.app``); the model routes are answered by a replica (``Ingress.forward``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from llmk import __version__
from llmk.config import ModelConfig
from llmk.errors import ModelNotFoundError
from llmk.server.admin import NewModel, check_model_paths, check_token
from llmk.server.app import handle_errors
from llmk.server.bodies import BodyLimit
from llmk.server.errors import ApiError, api_error

if TYPE_CHECKING:
    from llmk.ray.ingress import Ingress

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def create_ingress_app(ingress: Ingress) -> FastAPI:
    # The API's schema and docs are the replicas' (llmk serve's own), not this relay's.
    app = FastAPI(title="llmk", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=lambda: ingress.config.server.max_body_bytes)
    handle_errors(app)

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": ingress.started, "owned_by": "llmk"}

    def served(config: Any) -> list[str]:
        """Every configured model and its adapters (``NAME:ADAPTER``)."""
        return [n for name, model in config.models.items() for n in (name, *(f"{name}:{a}" for a in model.adapters))]

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """Every configured model: each serves, loaded on a replica when first asked for."""
        return {"object": "list", "data": [card(name) for name in served(await ingress.current_config())]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        names = served(await ingress.current_config())
        if name not in names:
            raise api_error(ModelNotFoundError(name, names))
        return card(name)

    @app.api_route("/v1/{path:path}", methods=_METHODS, response_model=None)
    async def forwarded(request: Request) -> Any:
        return await ingress.forward(request)

    for path in ("/openapi.json", "/docs", "/redoc"):
        app.add_api_route(path, forwarded, methods=["GET"], response_model=None, include_in_schema=False)

    @app.get("/health")
    async def health() -> Any:
        """Alive: the ingress answers and no replica's engine is stuck (503 naming them)."""
        stuck = {}
        for replica, status in (await ingress.ask_all("status")).items():
            for version in status["models"]:
                if version["current"] and version.get("stalled_since") is not None:
                    stuck.setdefault(replica, {})[version["name"]] = {"since": version["stalled_since"],
                                                                      "seconds": version["stalled_seconds"]}
        if stuck:
            return JSONResponse({"status": "stalled", "stalled": stuck}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        """Ready: at least one replica serves (each loads the models it is asked for)."""
        members = await ingress.members()
        if not members:
            return JSONResponse({"status": "loading", "replicas": 0}, status_code=503)
        config = await ingress.current_config()
        return {"status": "ready", "replicas": len(members), "replica_ids": members, "models": sorted(config.models)}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text: the ingress's counters, and every replica's metrics labelled ``replica``."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from llmk.ray.ingress import fleet_metrics

        replicas = await ingress.ask_all("metrics")
        body = await asyncio.to_thread(fleet_metrics, generate_latest(ingress.counters.registry), replicas,
                                       len(await ingress.members()))
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(admin_router(ingress))
    return app


def admin_router(ingress: Ingress) -> APIRouter:
    """``llmk serve``'s management API (``llmk.server.admin``) for the fleet: a load goes
    to one replica (the others load on demand), a swap, an unload and a reload go to
    every replica, one after another."""

    def authorized(request: Request) -> None:
        check_token(request, ingress.admin_token, ingress.config)

    admin = APIRouter(prefix="/admin", dependencies=[Depends(authorized)])

    def models_of(config: Any) -> dict[str, dict[str, Any]]:
        return {name: model.model_dump(mode="json", exclude_unset=True) for name, model in config.models.items()}

    def with_models(config: Any, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {**config.model_dump(mode="json", exclude_unset=True), "models": models}

    async def configured(name: str) -> Any:
        config = await ingress.current_config()
        if name not in config.models:
            raise api_error(ModelNotFoundError(name, config.models))
        return config

    async def first_member() -> str:
        members = await ingress.members()
        if not members:
            raise ApiError(503, "no replica is running yet", "server_error", code="no_replica",
                           headers={"Retry-After": "5"})
        return members[0]

    @admin.get("/models")
    async def list_models() -> dict[str, Any]:
        """Every model version on every replica, each naming its ``replica``."""
        answers = await ingress.ask_all("status")
        return {"object": "list", "data": [{**version, "replica": replica, "pid": status["pid"]}
                                           for replica, status in answers.items() for version in status["models"]]}

    @admin.post("/models", status_code=201)
    async def load_model(body: NewModel) -> dict[str, Any]:
        async with ingress.changes:
            config = await ingress.current_config()
            if body.name in config.models:
                raise ApiError(409, f"model {body.name!r} exists; PUT /admin/models/{body.name} swaps it",
                               param="name", code="model_exists")
            check_model_paths(body, config)
            model = ModelConfig.model_validate(body.model_dump(exclude={"name"}, exclude_unset=True))
            new = with_models(config, {**models_of(config), body.name: model.model_dump(mode="json",
                                                                                        exclude_unset=True)})
            await ingress.roll(new, "admin")
            try:  # answered once it serves somewhere; the other replicas load it when asked for
                status = await ingress.ask(await first_member(), "load", name=body.name)
            except Exception:
                await ingress.roll(with_models(config, models_of(config)), "admin")  # as it was
                raise
            return {**next(s for s in status["models"] if s["current"]), "replica": status["replica"]}

    @admin.put("/models/{name}")
    async def swap_model(name: str, body: ModelConfig) -> dict[str, Any]:
        async with ingress.changes:
            config = await configured(name)
            check_model_paths(body, config)
            spec = body.model_dump(mode="json", exclude_unset=True)
            new = with_models(config, {**models_of(config), name: spec})
            # The new version first loads on one replica: if it fails there, nothing changed.
            member = await first_member()
            await ingress.ask(member, "swap", name=name, model=spec)
            reports = await ingress.roll(new, "admin")
            return {"id": name, "object": "model", "replicas": reports}

    @admin.delete("/models/{name}")
    async def unload_model(name: str) -> dict[str, Any]:
        async with ingress.changes:
            config = await configured(name)
            models = models_of(config)
            models.pop(name)
            await ingress.roll(with_models(config, models), "admin")
            return {"id": name, "object": "model", "deleted": True}

    @admin.post("/reload")
    async def reload() -> dict[str, Any]:
        report = await ingress.reload("admin")
        if not report["ok"]:
            raise ApiError(400, report["error"], code="invalid_config")
        return report

    return admin
