"""The daemon's HTTP app (FastAPI): the OpenAI API (``api.py``), the management
API (``admin.py``), ``/health``, ``/ready``, ``/metrics`` and the OpenAPI schema
at ``/openapi.json``. Every error is an OpenAI-style JSON body (``errors.py``),
and every bad input is a 4xx: a body over ``server.max_body_bytes`` is a 413 before
it is read whole (``bodies.BodyLimit``), a body that is not UTF-8, not JSON or nests
deeper than ``bodies.MAX_JSON_DEPTH`` is a 400 that says so, a 405 carries ``Allow``.
The OpenAPI schema documents those answers (``openapi.document_errors``).

This module and the routers import FastAPI at the top: only ``Daemon`` imports
them, when a daemon is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from llmk import __version__
from llmk.errors import LlmkError
from llmk.server import admin, api, console, responses
from llmk.server.bodies import MAX_JSON_DEPTH, BodyLimit, BodyRefused
from llmk.server.errors import ApiError, api_error, error_response
from llmk.server.metrics import RequestLog
from llmk.server.openapi import document_errors

if TYPE_CHECKING:
    from starlette.types import Scope

    from llmk.server.daemon import Daemon

def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="llmk", version=__version__, description="An OpenAI-compatible LLM kernel daemon")
    # The last added runs first: the request log sees (and counts) the body limit's 413s.
    app.add_middleware(BodyLimit, limit=lambda: daemon.config.server.max_body_bytes)  # read per request: reloads
    app.add_middleware(RequestLog, metrics=daemon.metrics)

    handle_errors(app)

    app.include_router(api.router(daemon))
    app.include_router(responses.router(daemon))
    app.include_router(admin.router(daemon))

    @app.get("/health")
    async def health() -> Any:
        """Alive: the process answers and no model's engine is stuck (503 naming them:
        a stuck engine thread only ends with the process)."""
        stuck = stalled(daemon)
        if stuck:
            return JSONResponse({"status": "stalled", "stalled": stuck}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        """Ready: every configured model (and adapter) serves, none is stalled, and the daemon is not shutting down."""
        body = readiness(daemon)
        return body if body["status"] == "ready" else JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        body, content_type = daemon.metrics.render()
        return Response(body, media_type=content_type)

    console.mount(app, daemon)  # GET / and /console/*, out of the OpenAPI schema
    document_errors(app)
    return app


def stalled(daemon: Daemon) -> dict[str, dict[str, float]]:
    """The models whose engine the watchdog found stuck: since when (wall clock), for how long."""
    return {s["name"]: {"since": s["stalled_since"], "seconds": s["stalled_seconds"]}
            for s in daemon.kernel.status() if s["current"] and s.get("stalled_since") is not None}


def readiness(daemon: Daemon) -> dict[str, Any]:
    """What ``/ready`` answers (and the console shows): ``status`` is ready, draining,
    stalled (naming the models) or loading (naming those missing and why they failed)."""
    if daemon.draining:
        return {"status": "draining"}
    stuck = stalled(daemon)
    if stuck:
        return {"status": "stalled", "stalled": stuck}
    names = daemon.kernel.names()
    expected = {*daemon.config.models, *(f"{name}:{adapter}" for name, model in daemon.config.models.items()
                                         for adapter in model.adapters)}
    missing = sorted(expected - set(names))
    if missing:
        failed = {name: daemon.failures[name] for name in missing if name in daemon.failures}
        return {"status": "loading", "missing": missing, "failed": failed}
    return {"status": "ready", "models": names}


# -- errors ----------------------------------------------------------------------------------


def handle_errors(app: FastAPI) -> None:
    """Every error as an OpenAI-style body with its status (the daemon's app and the Ray ingress)."""

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if isinstance(error, BodyRefused):
            return error_response(error.error)
        headers = dict(error.headers or {})
        if error.status_code == 405:  # every method the path serves, not only its first route's
            headers["Allow"] = allowed_methods(app, request.scope) or headers.get("Allow", "")
        cause = error.__cause__  # FastAPI's "There was an error parsing the body" hides why
        if error.status_code == 400 and isinstance(cause, UnicodeDecodeError):
            return error_response(ApiError(400, f"the body is not valid UTF-8: {cause.reason}", code="invalid_json"))
        if error.status_code == 400 and isinstance(cause, RecursionError):
            return error_response(ApiError(400, f"the JSON nests deeper than {MAX_JSON_DEPTH} levels",
                                           code="invalid_json"))
        return error_response(ApiError(error.status_code, str(error.detail), code=str(error.status_code),
                                       headers=headers))

    @app.exception_handler(LlmkError)
    async def _on_kernel_error(request: Request, error: LlmkError) -> JSONResponse:
        # A kernel error no route caught (one raised while a body is validated): its usual answer.
        return error_response(api_error(error))

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, error: Exception) -> JSONResponse:
        # A bug: still an OpenAI-style 500 (Starlette re-raises it after, so the traceback is logged).
        return error_response(api_error(error))


#: Validation errors at the body's root that mean "the body is not a JSON object".
_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def _json_kind(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"),
                       (list, "an array")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def validation_error(errors: Any) -> ApiError:
    """A 400 for what FastAPI refused: each problem named by its field, and a body that is
    not JSON, or not a JSON object, said so in words."""
    problems = []
    param = None
    for item in errors:
        loc = tuple(item.get("loc", ()))
        kind = item.get("type")
        if kind == "json_invalid":  # FastAPI's json.JSONDecodeError: ("body", position)
            where = f" (at character {loc[1]})" if len(loc) > 1 else ""
            detail = (item.get("ctx") or {}).get("error") or item.get("msg", "decode error")
            return ApiError(400, f"the body is not valid JSON: {detail}{where}", code="invalid_json")
        if loc == ("body",) and kind == "missing":
            return ApiError(400, "the request needs a body: a JSON object", code="invalid_json")
        if loc == ("body",) and kind in _NOT_AN_OBJECT:
            value = item.get("input")
            if isinstance(value, (bytes, bytearray)):  # not parsed: no JSON content type
                return ApiError(400, "the body must be a JSON object sent with Content-Type: application/json",
                                code="invalid_json")
            return ApiError(400, f"the body must be a JSON object, not {_json_kind(value)}", code="invalid_json")
        where = ".".join(str(p) for p in loc if p != "body") or "body"
        param = param or where
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return ApiError(400, "; ".join(problems) or "the request is invalid", param=param)


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Scope) -> str:
    """The ``Allow`` of a 405: every method some route serves on the request's path (a
    route's own 405 names only its methods; included routers nest theirs)."""

    def served(method: str) -> bool:
        for route in app.router.routes:
            try:
                match, _ = route.matches({**scope, "method": method})
            except Exception:  # noqa: BLE001 - a route that cannot tell does not serve the path
                continue
            if match is Match.FULL:
                return True
        return False

    return ", ".join(method for method in _HTTP_METHODS if served(method))
