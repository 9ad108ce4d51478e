"""``llmk serve``: the daemon and its OpenAI-compatible HTTP API.

| module | what |
|---|---|
| ``daemon.py`` | the process: config, reload, signals, drain; ``serve()`` |
| ``app.py`` | the FastAPI app: health, readiness, metrics, error bodies |
| ``api.py`` | the OpenAI API (chat, completions, embeddings, models) |
| ``admin.py`` | the management API (bearer token) |
| ``metrics.py`` | Prometheus metrics and the per-request log event |
| ``errors.py`` | kernel errors as OpenAI-style HTTP errors |

FastAPI, uvicorn and prometheus-client (``llmk[serve]``) are imported only
when a daemon is built.
"""

from llmk.server.daemon import Daemon, ReloadReport, serve

__all__ = ["Daemon", "ReloadReport", "serve"]
