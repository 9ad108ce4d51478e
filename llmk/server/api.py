"""The OpenAI-compatible API: ``/v1/chat/completions`` (``stream: true`` as
server-sent events), ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``.

Generations go through each model's scheduler (continuous batching) from the
event loop itself: a request is tokenized, checked and queued in the handler and
its chunks are awaited as the engine thread hands them over, so no thread (and
no queue but the scheduler's, bounded by ``max_queue``) stands in between. Every
generation carries the server's ``request_timeout`` as its deadline, so a
request that runs too long stops generating (504, or an error event in a
stream); a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmk.errors import OptionsError
from llmk.server.errors import ApiError, api_error
from llmk.server.metrics import note

if TYPE_CHECKING:
    from llmk.server.daemon import Daemon


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


def _finish(reason: str | None) -> str:
    return "length" if reason in ("length", "cancelled") else (reason or "stop")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"the request took longer than this server allows ({seconds:g}s)", "server_error",
                    code="timeout")


def router(daemon: Daemon) -> APIRouter:
    api = APIRouter()
    started = int(time.time())

    def handle(request: Request, name: str) -> Any:
        try:
            model = daemon.kernel.get(name)
        except Exception as error:
            raise api_error(error) from None
        note(request, model=name)
        return model

    def sampling(body: _Body) -> dict[str, Any]:
        limit = daemon.config.server.max_completion_tokens
        max_tokens = body.max_completion_tokens or body.max_tokens or min(256, limit)
        if max_tokens > limit:
            raise ApiError(400, f"max_tokens={max_tokens} is more than this server allows ({limit})",
                           param="max_tokens")
        params = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                  "seed": body.seed, "stop": body.stop}
        from llmk.generation import SamplingParams

        try:
            SamplingParams.build(**params)  # refused here, before a stream's headers are sent
        except OptionsError as error:
            raise ApiError(400, str(error)) from None
        return {**params, "timeout": daemon.config.server.request_timeout,
                "max_prompt_tokens": daemon.config.server.max_prompt_tokens}

    async def call(function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking call (embeddings) in a thread, bounded by ``request_timeout``."""
        return await bounded(asyncio.to_thread(function, *args, **kwargs))

    async def bounded(work: Any) -> Any:
        # Generations stop at their own deadline; this bounds everything else (waiting for a load).
        limit = daemon.config.server.request_timeout
        try:
            return await asyncio.wait_for(work, limit + 1.0)
        except TimeoutError:
            raise _timed_out(limit) from None
        except Exception as error:
            raise api_error(error) from None

    async def queued(stream: Any) -> Any:
        """A stream validated and queued, so that bad input is a 4xx before any header is sent."""
        await bounded(stream.start())
        return stream

    def finished(request: Request, result: Any) -> None:
        note(request, tokens_in=result.prompt_tokens, tokens_out=result.completion_tokens,
             finish_reason=result.finish_reason)
        if result.finish_reason == "timeout":
            raise _timed_out(daemon.config.server.request_timeout)

    def stream(request: Request, chunks: AsyncIterator[Any], ident: str, created: int, model: str,
               chat: bool) -> StreamingResponse:
        return StreamingResponse(_sse(request, chunks, ident, created, model, chat=chat,
                                      timeout=daemon.config.server.request_timeout),
                                 media_type="text/event-stream")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "llmk"}

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in daemon.kernel.names()]}

    @api.get("/v1/models/{name}")
    async def get_model(request: Request, name: str) -> dict[str, Any]:
        handle(request, name)
        return model_card(name)

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatBody) -> Any:
        model = handle(request, body.model)
        params = sampling(body)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            chunks = await queued(model.achat_stream(messages, **params))
            return stream(request, chunks, ident, created, body.model, chat=True)
        result = await bounded(model.achat(messages, **params))
        finished(request, result)
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": _finish(result.finish_reason), "logprobs": None}],
                "usage": _usage(result.prompt_tokens, result.completion_tokens)}

    @api.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionBody) -> Any:
        model = handle(request, body.model)
        params = sampling(body)
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            chunks = await queued(model.astream(body.prompt, **params))
            return stream(request, chunks, ident, created, body.model, chat=False)
        result = await bounded(model.agenerate(body.prompt, **params))
        finished(request, result)
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": result.text, "finish_reason": _finish(result.finish_reason),
                             "logprobs": None}],
                "usage": _usage(result.prompt_tokens, result.completion_tokens)}

    @api.post("/v1/embeddings")
    async def embeddings(request: Request, body: EmbeddingBody) -> dict[str, Any]:
        model = handle(request, body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if any(not t for t in texts):
            raise ApiError(400, "input: every text must be non-empty", param="input")
        vectors, tokens = await call(lambda: (model.embed(texts), sum(model.count_tokens(t) for t in texts)))
        note(request, tokens_in=tokens)
        if body.encoding_format == "base64":
            import base64

            import numpy as np

            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return api


async def _sse(request: Request, chunks: AsyncIterator[Any], ident: str, created: int, model: str, *, chat: bool,
               timeout: float) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
    If the client goes away, the generator is closed, which cancels the generation."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(payload: dict[str, Any]) -> str:
        return "data: " + json.dumps(payload) + "\n\n"

    def choice(fields: dict[str, Any]) -> str:
        return event({"id": ident, "object": kind, "created": created, "model": model,
                      "choices": [{"index": 0, **fields}]})

    tokens_out = 0
    note(request, finish_reason="cancelled")  # unless the stream gets to its end
    try:
        if chat:
            yield choice({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for chunk in chunks:
            tokens_out += len(chunk.token_ids)
            if chunk.finish_reason == "timeout":
                raise _timed_out(timeout)
            finish = _finish(chunk.finish_reason) if chunk.finish_reason else None
            if chunk.finish_reason:
                note(request, finish_reason=chunk.finish_reason)
            if chat:
                yield choice({"delta": {"content": chunk.text} if chunk.text else {}, "finish_reason": finish})
            else:
                yield choice({"text": chunk.text, "finish_reason": finish, "logprobs": None})
    except Exception as error:  # headers are sent: report it in the stream, OpenAI-style
        api = api_error(error)
        note(request, finish_reason=api.code or "error", error=api.message)
        yield event({"error": {"message": api.message, "type": api.type, "code": api.code}})
    finally:  # also when the client went away: stop the generation now, not at garbage collection
        note(request, tokens_out=tokens_out)
        await chunks.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"
