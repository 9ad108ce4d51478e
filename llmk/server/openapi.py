"""The OpenAPI schema at ``/openapi.json`` documents every error answer
(``document_errors``): each operation lists the 4xx and 5xx it can give with the
OpenAI error body, llmk's 400 replaces FastAPI's 422, streaming routes document
``text/event-stream`` and the management API its bearer token."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}

#: Every error answer's body (``errors.ApiError.body``).
ERROR_BODY: dict[str, Any] = {
    "title": "ErrorBody",
    "description": "Every error answer: OpenAI's error object.",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string", "description": "What went wrong, in words."},
            "type": {"type": "string", "description": "invalid_request_error, authentication_error, "
                                                      "permission_error, rate_limit_error or server_error."},
            "param": {**_NULLABLE_STRING, "description": "The request field at fault, if one is."},
            "code": {**_NULLABLE_STRING, "description": "A stable code: model_not_found, queue_full, "
                                                       "request_too_large, invalid_json..."},
        },
    }},
}

#: ``/health`` and ``/ready``'s answers.
STATUS_BODY: dict[str, Any] = {"title": "StatusBody", "type": "object", "required": ["status"],
                               "properties": {"status": {"type": "string"}}, "additionalProperties": True}

_ERRORS = {
    400: "Bad request: a body that is not UTF-8, not JSON or nests too deep, a field that fails validation, "
         "or a field or value this server does not support (named in the message).",
    401: "No admin token, or the wrong one (`Authorization: Bearer <token>`).",
    403: "The management API is off (no token is set), or the source is not one this server may load.",
    404: "Unknown model, stored response or path.",
    409: "The name is taken, or the memory budget is held by models that may not be evicted.",
    413: "The body is larger than `server.max_body_bytes`.",
    422: "The optimization passes' output failed the quality gate; what served before still serves.",
    429: "The model's queue is full: retry after `Retry-After` seconds.",
    500: "An internal error (a bug).",
    503: "The model is loading, failed to load, is stuck or was unloaded: retry after `Retry-After` seconds.",
    504: "The request took longer than `server.request_timeout`.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}
_GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
_STREAMING = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def error_statuses(path: str, method: str) -> list[int]:
    """The error statuses an operation can answer."""
    statuses = [400, 404, 413, 500]
    if path in _GENERATION and method == "post":
        statuses += [429, 503, 504]
    if path.startswith("/admin/"):
        statuses += [401, 403]
        if path.startswith("/admin/models") and method in ("post", "put"):
            statuses += [409, 422, 503]
    return sorted(statuses)


def _error_answer(status: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": _ERRORS[status],
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    if status in (429, 503):
        answer["headers"] = _RETRY_AFTER
    if status == 401:
        answer["headers"] = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
    return answer


def document_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` document llmk's error answers: each operation's error
    statuses with the ``ErrorBody`` schema (400, not FastAPI's 422, for validation),
    the admin routes' bearer token, the event streams and ``/metrics``' text."""
    documented: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        schema = FastAPI.openapi(app)  # FastAPI's, cached until the routes change
        if documented and documented[0] is schema:
            return schema
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas["ErrorBody"], schemas["StatusBody"] = ERROR_BODY, STATUS_BODY
        components.setdefault("securitySchemes", {})["adminToken"] = {
            "type": "http", "scheme": "bearer",
            "description": "The token in the environment variable that `server.admin_token_env` names."}
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                if method not in _METHODS:
                    continue
                answers = operation.setdefault("responses", {})
                answers.pop("422", None)
                for status in error_statuses(path, method):
                    answers[str(status)] = _error_answer(status)
                if path.startswith("/admin/"):
                    operation["security"] = [{"adminToken": []}]
                if path in ("/health", "/ready"):
                    answers["503"] = {"description": "Not alive (a model's engine is stuck) or not ready "
                                                     "(loading, stuck or shutting down).",
                                      "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/StatusBody"}}}}
                ok = answers.get("200", {})
                if path in _STREAMING and method == "post" and "content" in ok:
                    ok["content"]["text/event-stream"] = {"schema": {
                        "type": "string", "description": "With `stream: true`: server-sent events, each "
                                                         "`data: <JSON chunk>`, the last `data: [DONE]`."}}
                if path == "/metrics" and "content" in ok:
                    ok["content"] = {"text/plain": {"schema": {"type": "string",
                                                               "description": "Prometheus text format"}}}
        if "#/components/schemas/HTTPValidationError" not in json.dumps(schema.get("paths", {})):
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
        documented[:] = [schema]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
