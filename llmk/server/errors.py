"""HTTP errors: the kernel's typed errors become OpenAI-style bodies here, and only here.

Every error answer is ``{"error": {"message", "type", "param", "code"}}`` with a
4xx/5xx status; a full queue or a model that is not ready also says when to
come back (``Retry-After``).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from llmk.cache import CacheFullError
from llmk.errors import (
    BackendUnavailableError,
    LlmkError,
    MemoryBudgetError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    OptionsError,
    PluginError,
    QualityGateError,
    SourceError,
    UnknownNameError,
    UnsupportedError,
)
from llmk.generation import PromptTooLongError
from llmk.logs import get_logger
from llmk.scheduler import EngineClosedError, EngineStalledError, QueueFullError

log = get_logger("llmk.server")


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def timed_out(seconds: float) -> ApiError:
    """A request that ran past the server's ``request_timeout``."""
    return ApiError(504, f"the request took longer than this server allows ({seconds:g}s)", "server_error",
                    code="timeout")


def api_error(error: Exception) -> ApiError:
    """The HTTP answer to an error raised by the kernel."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ModelNotFoundError):
        return ApiError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, QueueFullError):
        return ApiError(429, str(error), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(error, EngineStalledError):  # the watchdog failed it: the model is stuck
        return ApiError(503, str(error), "server_error", code="model_stalled", headers={"Retry-After": "30"})
    if isinstance(error, EngineClosedError):  # unloaded or swapped out under the request
        return ApiError(503, str(error), "server_error", code="model_unloaded", headers={"Retry-After": "1"})
    if isinstance(error, CacheFullError):  # the server's disk, not the request
        return ApiError(507, str(error), "server_error", code="insufficient_storage")
    if isinstance(error, ModelNotReadyError):
        return ApiError(503, str(error), "server_error", code="model_loading", headers={"Retry-After": "5"})
    if isinstance(error, MemoryBudgetError):  # the budget is taken by models that may not be evicted
        return ApiError(409, str(error), "invalid_request_error", code="memory_budget")
    if isinstance(error, ModelLoadError):
        return ApiError(503, str(error), "server_error", code="model_unavailable", headers={"Retry-After": "30"})
    if isinstance(error, PromptTooLongError):
        return ApiError(400, str(error), code="context_length_exceeded")
    if isinstance(error, QualityGateError):  # the passes' output was refused; what served before still serves
        return ApiError(422, str(error), code="quality_gate")
    if isinstance(error, (OptionsError, UnsupportedError, UnknownNameError, SourceError, PluginError,
                          BackendUnavailableError)):
        return ApiError(400, str(error))
    if isinstance(error, LlmkError):
        return ApiError(500, str(error), "server_error")
    log.error("request.failed", error=repr(error))
    return ApiError(500, f"internal error: {type(error).__name__}", "server_error")


class _ErrorJSON(JSONResponse):
    """An error body, as ASCII JSON: its message may quote what the client sent, lone
    surrogates included, which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: ApiError) -> JSONResponse:
    return _ErrorJSON(error.body(), status_code=error.status, headers=error.headers)
