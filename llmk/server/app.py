"""The daemon's HTTP app (FastAPI): the OpenAI API (``api.py``), the management
API (``admin.py``), ``/health``, ``/ready``, ``/metrics`` and the OpenAPI schema
at ``/openapi.json``. Every error is an OpenAI-style JSON body (``errors.py``).

This module and the routers import FastAPI at the top: only ``Daemon`` imports
them, when a daemon is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmk import __version__
from llmk.server import admin, api, responses
from llmk.server.errors import ApiError
from llmk.server.metrics import RequestLog

if TYPE_CHECKING:
    from llmk.server.daemon import Daemon


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="llmk", version=__version__, description="An OpenAI-compatible LLM kernel daemon")
    app.add_middleware(RequestLog, metrics=daemon.metrics)

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        param = None
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
            param = param or where
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return error_response(ApiError(400, "; ".join(problems), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(error.status_code, str(error.detail), code=str(error.status_code)))

    app.include_router(api.router(daemon))
    app.include_router(responses.router(daemon))
    app.include_router(admin.router(daemon))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        """Ready: every configured model serves, and the daemon is not shutting down."""
        if daemon.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        names = daemon.kernel.names()
        missing = sorted(set(daemon.config.models) - set(names))
        if missing:
            failed = {name: daemon.failures[name] for name in missing if name in daemon.failures}
            return JSONResponse({"status": "loading", "missing": missing, "failed": failed}, status_code=503)
        return {"status": "ready", "models": names}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        body, content_type = daemon.metrics.render()
        return Response(body, media_type=content_type)

    return app
