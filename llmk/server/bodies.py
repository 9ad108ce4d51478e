"""The request body before FastAPI reads it (``BodyLimit``, a pure ASGI middleware):
a body over ``server.max_body_bytes`` is a 413 before it is read whole (at once from
``Content-Length``, or as a chunked body passes the limit), and a JSON body that is
not UTF-8 or nests deeper than ``MAX_JSON_DEPTH`` is a 400 that says so — before a
parser spends time or stack on it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmk.server.errors import ApiError, error_response

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: How deep a JSON body may nest (objects and arrays); deeper is a 400 before it is parsed.
MAX_JSON_DEPTH = 64


class BodyRefused(StarletteHTTPException):
    """A body refused while it is read (too large, not UTF-8, nested too deep). Raised from
    ``receive``: FastAPI lets an HTTP error from there through to the error handlers, and
    ``BodyLimit`` answers it if nothing else did."""

    def __init__(self, error: ApiError):
        super().__init__(error.status, error.message, headers=error.headers or None)
        self.error = error


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server accepts: at most {limit:,} bytes "
                         "(server.max_body_bytes)", code="request_too_large")


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes included; linear
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth_over(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``body`` nests objects and arrays deeper than ``limit``:
    a scan of its brackets outside strings, in C and numpy, before any parser recurses."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    import numpy as np

    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max()) > limit


def json_problem(body: bytes, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why a JSON body cannot be parsed safely (not UTF-8, nested too deep), or None."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the body is not valid UTF-8: byte 0x{body[error.start]:02x} at position {error.start}"
    if json_depth_over(body, limit):
        return f"the JSON nests deeper than {limit} levels"
    return None


def _json_content(content_type: str | None) -> bool:
    """Whether FastAPI would parse a body of this type as JSON (no type: it might)."""
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class BodyLimit:
    """Pure ASGI middleware: a body over ``limit()`` bytes is a 413. A ``Content-Length``
    over it is answered at once, unread; a chunked body is counted as it streams in and
    refused once past it. A JSON body is also checked, when it is whole and before it is
    parsed, for UTF-8 and for nesting deeper than ``MAX_JSON_DEPTH`` (a 400 each).
    ``limit`` is called per request, so that a reload's new limit applies at once."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        headers = Headers(scope=scope)
        try:
            declared: int | None = int(headers.get("content-length", ""))
        except ValueError:  # none (chunked), or not a number (which the server itself refuses)
            declared = None
        if declared is not None and declared > limit:
            await error_response(too_large(limit))(scope, receive, send)
            return
        check = _json_content(headers.get("content-type"))
        chunks: list[bytes] = []
        size = 0
        started = False

        async def limited() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] != "http.request":
                return message
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise BodyRefused(too_large(limit))
            if check:
                chunks.append(body)
                if not message.get("more_body", False):
                    problem = json_problem(b"".join(chunks))
                    chunks.clear()
                    if problem:
                        raise BodyRefused(ApiError(400, problem, code="invalid_json"))
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except BodyRefused as refused:  # read where no error handler answered it
            if started:
                raise
            await error_response(refused.error)(scope, receive, send)


