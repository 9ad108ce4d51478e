"""The management API, behind a bearer token read from the environment
variable that ``server.admin_token_env`` names (without a token there it is off).

- ``GET /admin/models``: every model version, as ``kernel.status()`` reports it;
- ``POST /admin/models``: load a new model (``{"name": ..., "source": ..., ...}``, a
  config file's model entry plus its name); 409 if the name is taken;
- ``PUT /admin/models/{name}``: hot-swap ``name`` to the spec in the body; when the
  new version fails, the old one keeps serving and the error is the answer;
- ``DELETE /admin/models/{name}``: stop routing to it, drain, unload;
- ``POST /admin/reload``: reload the config file now (what SIGHUP does), and
  answer what changed, or why the file was refused.

A token holder may load ``builtin:`` models, plugins' sources, the paths the config
file names and paths under ``server.model_roots``; any other path is a 403 that
says the same whether or not the path exists.

Each call returns when the change is done: a load answers once the model serves.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.encoders import jsonable_encoder
from pydantic import Field

from llmk.config import ModelConfig
from llmk.errors import ModelNotFoundError
from llmk.server.errors import ApiError, api_error
from llmk.server.metrics import note

if TYPE_CHECKING:
    from llmk.config import Config
    from llmk.server.daemon import Daemon


class NewModel(ModelConfig):
    name: str = Field(min_length=1, pattern=r"^[^/\s](?:[^/]*[^/\s])?$", description="the name clients call it by")


def router(daemon: Daemon) -> APIRouter:
    def authorized(request: Request) -> None:
        check_token(request, daemon.admin_token, daemon.config)

    admin = APIRouter(prefix="/admin", dependencies=[Depends(authorized)])

    def versions(name: str | None = None) -> list[dict[str, Any]]:
        return jsonable_encoder([s for s in daemon.kernel.status() if name is None or s["name"] == name])

    def current(name: str) -> dict[str, Any]:
        return next(s for s in versions(name) if s["current"])

    async def run(function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except Exception as error:
            raise api_error(error) from None

    @admin.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": versions()}

    @admin.post("/models", status_code=201)
    async def load_model(request: Request, body: NewModel) -> dict[str, Any]:
        note(request, model=body.name)
        try:
            daemon.kernel.get(body.name)  # serving or loading
        except ModelNotFoundError:
            pass
        else:
            raise ApiError(409, f"model {body.name!r} exists; PUT /admin/models/{body.name} swaps it",
                           param="name", code="model_exists")
        check_model_paths(body, daemon.config)
        config = ModelConfig.model_validate(body.model_dump(exclude={"name"}))
        await run(daemon.load, body.name, config)
        return current(body.name)

    @admin.put("/models/{name}")
    async def swap_model(request: Request, name: str, body: ModelConfig) -> dict[str, Any]:
        await run(daemon.kernel.get, name)  # 404 for an unknown name, before any work
        note(request, model=name)
        check_model_paths(body, daemon.config)
        await run(daemon.load, name, body)
        return current(name)

    @admin.delete("/models/{name}")
    async def unload_model(request: Request, name: str) -> dict[str, Any]:
        await run(daemon.kernel.get, name)
        note(request, model=name)
        await run(daemon.kernel.unload, name)
        return {"id": name, "object": "model", "deleted": True}

    @admin.post("/reload")
    async def reload() -> dict[str, Any]:
        report = await asyncio.to_thread(daemon.reload, "admin")
        if not report.ok:
            raise ApiError(400, report.error or "the configuration was refused", code="invalid_config")
        return report.as_dict()

    return admin


def check_token(request: Request, token: str | None, config: Config) -> None:
    """The management API's door: off without a token, 401 without the right one."""
    if not token:
        raise ApiError(403, f"the management API is off: set the environment variable "
                            f"{config.server.admin_token_env} to a token to turn it on",
                       "permission_error", code="admin_disabled")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "the management API needs 'Authorization: Bearer <token>' with the admin token",
                       "authentication_error", code="invalid_token", headers={"WWW-Authenticate": "Bearer"})


def check_model_paths(model: ModelConfig, config: Config) -> None:
    """Every local path a model spec names (source, draft, adapters, update data and
    eval), held to ``check_source``'s rule."""
    for source, param in ((model.source, "source"), (model.draft, "draft"),
                          *((path, "adapters") for path in model.adapters.values()),
                          *((path, "update") for path in _update_paths(model))):
        check_source(source, config, param)


def check_source(source: str | None, config: Config, param: str = "source") -> None:
    """Refuse a local path outside ``server.model_roots`` and the config file's own
    sources: the same 403 whether or not anything exists there. ``param`` names the
    field (a draft model's source and adapters are held to the same rule; adapters
    may also come from the cache's ``adapters/``, where ``llmk tune`` puts them)."""
    if source is None:
        return
    if "\x00" in source:
        raise ApiError(400, f"{param}: a NUL character cannot be in a path or a source name", param=param)
    if not _is_path(source):
        return  # builtin: or a plugin's scheme: no file system behind the caller's string
    path = os.path.realpath(os.path.expanduser(source))
    roots = [os.path.realpath(os.path.expanduser(root)) for root in config.server.model_roots]
    if param == "adapters":  # what ``llmk tune`` made in this server's own cache
        from llmk.cache import default_cache_dir

        cache = os.path.expanduser(config.kernel.cache_dir) if config.kernel.cache_dir else default_cache_dir()
        roots.append(os.path.realpath(os.path.join(cache, "adapters")))
    named = {os.path.realpath(os.path.expanduser(s)) for m in config.models.values()
             for s in (m.source, m.draft, *m.adapters.values(), *_update_paths(m)) if s is not None and _is_path(s)}
    if path in named or any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        return
    raise ApiError(403, f"{param} {source!r} is not under a directory this server loads from "
                   "(server.model_roots) nor named in its config file", "permission_error",
                   param=param, code="source_not_allowed")


def _update_paths(model: ModelConfig) -> tuple[str, ...]:
    return () if model.update is None else (model.update.data, model.update.eval)


def _is_path(source: str) -> bool:
    """A local path, as opposed to ``builtin:NAME`` or a plugin's ``scheme:NAME``."""
    scheme, colon, _ = source.partition(":")
    return not colon or "/" in scheme or "\\" in scheme or len(scheme) == 1  # (a drive letter)
