"""The web console: a page at ``GET /`` that shows the models and their figures live,
a playground (chat, embeddings) and the admin actions, over the daemon's own APIs.

- ``GET /``: the page; ``GET /console/static/NAME``: its scripts and styles (vanilla
  JavaScript modules and CSS shipped in the package: no build step, no CDN);
- ``GET /console/state``: the JSON the page polls, for scripts too (its shape is in
  the README): ``kernel.status()`` per version with its recent rates, ``/ready``'s
  answer, memory against the budget, the lifecycle counters, recent events and
  alerts, and a few minutes of history.

The page calls ``/v1/*`` for the playground and ``/admin/*`` with the token the user
types, which it keeps in memory only. ``server.console: false`` turns all of it into
404s (read per request: a reload applies it). None of it is in the OpenAPI schema.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from llmk import __version__
from llmk.server.console.state import HISTORY_SECONDS, Recorder

if TYPE_CHECKING:
    from llmk.server.daemon import Daemon

STATIC = Path(__file__).parent / "static"
#: Every file the page may load, and its type: nothing else under STATIC is served.
FILES = {
    "console.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "util.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
}
#: Only the daemon's own scripts, styles and APIs; no inline script, no framing.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded daemon serves its new page at once
}


def mount(app: FastAPI, daemon: Daemon) -> Recorder:
    """Add the console's routes to ``app`` and its recorder to the daemon's kernel."""
    recorder = Recorder()
    daemon.kernel.plugins.pm.register(recorder, name=recorder.__name__)

    def enabled() -> None:
        if not daemon.config.server.console:
            raise HTTPException(404, "Not Found")

    console = APIRouter(include_in_schema=False, dependencies=[Depends(enabled)])

    @console.get("/")
    async def page() -> Response:
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers=HEADERS)

    @console.get("/console/static/{name}")
    async def static(name: str) -> Response:
        if name not in FILES:
            raise HTTPException(404, f"no console file {name!r}")
        return Response((STATIC / name).read_bytes(), media_type=FILES[name], headers=HEADERS)

    @console.get("/console/state")
    async def state() -> dict[str, Any]:
        return console_state(daemon, recorder)

    app.include_router(console)
    return recorder


def console_state(daemon: Daemon, recorder: Recorder) -> dict[str, Any]:
    """The console's JSON: what the page shows, in one answer."""
    from llmk.server.app import readiness

    status = daemon.kernel.status()
    figures = daemon.kernel.metrics()
    recorder.sample(status, figures["memory"])
    recorded = recorder.snapshot()
    zero = {"tokens_per_second": 0.0, "requests_per_second": 0.0}
    models = [{**version, **(recorded["rates"].get(version["name"], zero) if version["current"] else zero)}
              for version in status]
    return jsonable_encoder({
        "object": "llmk.console.state",
        "time": time.time(),
        "llmk_version": __version__,
        "readiness": readiness(daemon),
        "admin_enabled": daemon.admin_token is not None,
        "memory": figures.pop("memory"),
        "lifecycle": figures,
        "models": models,
        "events": recorded["events"],
        "history": recorded["history"],
        "history_seconds": HISTORY_SECONDS,
    })
