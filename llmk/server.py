"""``llmk serve``: the kernel behind an OpenAI-compatible HTTP API (FastAPI).

Endpoints: ``/v1/chat/completions`` (``stream: true`` as server-sent events),
``/v1/completions``, ``/v1/embeddings``, ``/v1/models``; ``/health`` and
``/ready``. Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.
Generations go through each model's scheduler (continuous batching); a client
that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmk.errors import (
    LlmkError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    OptionsError,
    UnsupportedError,
)
from llmk.logs import get_logger
from llmk.scheduler import QueueFullError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llmk.config import Config
    from llmk.kernel import Kernel

log = get_logger("llmk.server")


# -- request bodies (OpenAI's shapes; unknown fields are accepted and ignored, as OpenAI's are) --


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str = Field(min_length=1)


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    #: "base64": little-endian float32 bytes, base64-encoded (what the openai client asks for).
    encoding_format: Literal["float", "base64"] = "float"


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def _api_error(error: Exception) -> ApiError:
    """The HTTP answer to an error raised by the kernel."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ModelNotFoundError):
        return ApiError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, QueueFullError):
        return ApiError(429, str(error), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(error, ModelNotReadyError):
        return ApiError(503, str(error), "server_error", code="model_loading", headers={"Retry-After": "5"})
    if isinstance(error, ModelLoadError):
        return ApiError(503, str(error), "server_error", code="model_unavailable", headers={"Retry-After": "30"})
    if isinstance(error, (OptionsError, UnsupportedError)):
        return ApiError(400, str(error))
    if isinstance(error, LlmkError):
        return ApiError(500, str(error), "server_error")
    log.error("request.failed", error=repr(error))
    return ApiError(500, f"internal error: {type(error).__name__}", "server_error")


def _sampling(body: _Body, config: Config) -> dict[str, Any]:
    limit = config.server.max_completion_tokens
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, limit)
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this server allows ({limit})", param="max_tokens")
    params = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
              "stop": body.stop}
    from llmk.generation import SamplingParams

    try:
        SamplingParams.build(**params)  # refused here, before a stream's headers are sent
    except OptionsError as error:
        raise ApiError(400, str(error)) from None
    return params


def _finish(reason: str | None) -> str:
    return "length" if reason in ("length", "timeout", "cancelled") else (reason or "stop")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(kernel: Kernel, config: Config) -> FastAPI:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from llmk import __version__

    app = FastAPI(title="llmk", version=__version__, description="An OpenAI-compatible LLM kernel daemon")
    app.state.kernel, app.state.config = kernel, config
    started = int(time.time())

    def error_response(error: ApiError) -> JSONResponse:
        body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
        return JSONResponse(body, status_code=error.status, headers=error.headers)

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

    def handle(name: str) -> Any:
        try:
            return kernel.get(name)
        except ModelNotFoundError as error:
            raise _api_error(error) from None

    async def call(function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.wait_for(asyncio.to_thread(function, *args, **kwargs),
                                          config.server.request_timeout)
        except TimeoutError:
            raise ApiError(504, f"the request took longer than {config.server.request_timeout}s", "server_error",
                           code="timeout") from None
        except Exception as error:
            raise _api_error(error) from None

    def check_prompt(model: Any, text: str) -> None:
        tokens = len(model.version.engine.tokenizer.encode(text))
        if tokens > config.server.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {tokens} tokens; this server accepts at most "
                                f"{config.server.max_prompt_tokens}", param="messages", code="context_length_exceeded")

    # -- OpenAI API ---------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": started, "owned_by": "llmk"} for name in kernel.names()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        handle(name)
        return {"id": name, "object": "model", "created": started, "owned_by": "llmk"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatBody) -> Any:
        model = handle(body.model)
        params = _sampling(body, config)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        check_prompt(model, " ".join(m["content"] for m in messages))
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return StreamingResponse(
                _sse(model.achat_stream(messages, **params), ident, created, body.model, chat=True),
                media_type="text/event-stream")
        result = await call(model.chat, messages, **params)
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": _finish(result.finish_reason), "logprobs": None}],
                "usage": _usage(result.prompt_tokens, result.completion_tokens)}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> Any:
        model = handle(body.model)
        params = _sampling(body, config)
        check_prompt(model, body.prompt)
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return StreamingResponse(_sse(model.astream(body.prompt, **params), ident, created, body.model,
                                          chat=False), media_type="text/event-stream")
        result = await call(model.generate, body.prompt, **params)
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": result.text, "finish_reason": _finish(result.finish_reason),
                             "logprobs": None}],
                "usage": _usage(result.prompt_tokens, result.completion_tokens)}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody) -> dict[str, Any]:
        model = handle(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if any(not t for t in texts):
            raise ApiError(400, "input: every text must be non-empty", param="input")
        vectors = await call(model.embed, texts)
        tokens = sum(len(model.version.engine.tokenizer.encode(t)) for t in texts)
        if body.encoding_format == "base64":
            import base64

            import numpy as np

            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # -- health -----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        missing = sorted(set(config.models) - set(kernel.names()))
        if missing:
            return JSONResponse({"status": "loading", "missing": missing}, status_code=503)
        return {"status": "ready", "models": kernel.names()}

    return app


async def _sse(chunks: AsyncIterator[Any], ident: str, created: int, model: str, *, chat: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
    If the client goes away, the generator is closed, which cancels the generation."""
    import json

    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict[str, Any]) -> str:
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": model,
                                      "choices": [{"index": 0, **choice}]}) + "\n\n"

    try:
        if chat:
            yield event({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for chunk in chunks:
            finish = _finish(chunk.finish_reason) if chunk.finish_reason else None
            if chat:
                yield event({"delta": {"content": chunk.text} if chunk.text else {}, "finish_reason": finish})
            else:
                yield event({"text": chunk.text, "finish_reason": finish, "logprobs": None})
    except Exception as error:  # headers are sent: report it in the stream, OpenAI-style
        api = _api_error(error)
        yield "data: " + json.dumps({"error": {"message": api.message, "type": api.type, "code": api.code}}) + "\n\n"
    finally:  # also when the client went away: stop the generation now, not at garbage collection
        await chunks.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


def serve(config: Config) -> int:
    """Run the daemon until interrupted: bind, print where it listens, load the
    configured models in the background (``/ready`` says when), serve."""
    import socket
    import threading

    import uvicorn

    from llmk.kernel import Kernel

    kernel = Kernel(cache_dir=config.kernel.cache_dir, disable=config.plugins.disable,
                    autoload=config.plugins.autoload, memory_budget=config.kernel.memory_budget,
                    drain_timeout=config.kernel.drain_timeout, wait_timeout=config.kernel.wait_timeout,
                    alerts=[a.rule() for a in config.kernel.alerts], max_queue=config.server.max_queue)
    app = create_app(kernel, config)
    sock = socket.socket(socket.AF_INET6 if ":" in config.server.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.server.host, config.server.port))
    sock.listen(2048)  # connections queue from now on, even before uvicorn starts accepting
    host, port = sock.getsockname()[:2]

    def load_models() -> None:
        for name, model in config.models.items():
            try:
                kernel.load(name, pinned=model.pinned, keep_alive=model.keep_alive, **model.spec().model_dump())
                log.info("serve.model_ready", model=name)
            except Exception as error:  # the others still load and serve
                log.error("serve.model_failed", model=name, error=str(error))
                print(f"llmk serve: model {name!r} failed to load: {error}", flush=True)

    threading.Thread(target=load_models, name="llmk-serve-load", daemon=True).start()
    print(f"llmk serve: listening on http://{host}:{port} (models: {', '.join(config.models) or 'none'})",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(
        config.server.shutdown_timeout)))
    try:
        server.run(sockets=[sock])
    finally:
        kernel.close()
    return 0
