"""The OpenAI-compatible API: ``/v1/chat/completions`` and ``/v1/completions``
(``stream: true`` as server-sent events), ``/v1/embeddings``, ``/v1/models``;
``/v1/responses`` lives in ``llmk.server.responses``.

Generations go through each model's scheduler (continuous batching) from the
event loop itself: a request is tokenized, checked and queued in the handler and
its chunks are awaited as the engine thread hands them over, so no thread (and
no queue but the scheduler's, bounded by ``max_queue``) stands in between. Every
generation carries the server's ``request_timeout`` as its deadline, so a
request that runs too long stops generating (504, or an error event in a
stream); a client that disconnects cancels its generation. ``n`` choices and
lists of prompts run as rows of the same batch; their streams are interleaved,
each chunk naming its choice's ``index``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llmk.errors import OptionsError
from llmk.server.errors import ApiError, api_error, timed_out
from llmk.server.metrics import note
from llmk.server.requests import ChatBody, CompletionBody, EmbeddingBody, GenerationBody

if TYPE_CHECKING:
    from llmk.server.daemon import Daemon


def _finish(reason: str | None) -> str:
    return "length" if reason in ("length", "cancelled") else (reason or "stop")


def chat_logprobs(logprobs: list[Any] | None) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [entry(p.token, p.logprob) | {"top_logprobs": [entry(a.token, a.logprob) for a in p.top]}
                        for p in logprobs], "refusal": None}


def completion_logprobs(logprobs: list[Any], offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs``: parallel lists, and each token's offset in the text."""
    tokens, offsets = [], []
    for p in logprobs:
        offsets.append(offset)
        offset += len(p.token)
        tokens.append(p.token)
    return {"tokens": tokens, "token_logprobs": [p.logprob for p in logprobs],
            "top_logprobs": [None if p.logprob is None else {a.token: a.logprob for a in p.top} for p in logprobs],
            "text_offset": offsets}


def tool_call_deltas(calls: list[Any], first: int) -> list[dict[str, Any]]:
    return [{"index": first + i, **call.as_openai()} for i, call in enumerate(calls)]


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_for(daemon: Daemon, request: Request, name: str) -> Any:
    """The handle of the model a request names (404 when unknown), noted in its log line."""
    try:
        model = daemon.kernel.get(name)
    except Exception as error:
        raise api_error(error) from None
    note(request, model=name)
    return model


def generation_params(daemon: Daemon, max_tokens: int | None, param: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A generation's library parameters: ``max_tokens`` settled against the server's cap
    (default min(256, cap); ``param`` names the request's field), the rest validated
    here so that bad input is a 400 before a stream's headers go out, and the server's
    deadline and prompt cap."""
    from llmk.generation import SamplingParams

    server = daemon.config.server
    limit = server.max_completion_tokens
    max_tokens = max_tokens or min(256, limit)
    if max_tokens > limit:
        raise ApiError(400, f"{param}={max_tokens} is more than this server allows ({limit})", param=param)
    params = {"max_tokens": max_tokens, **{k: v for k, v in fields.items() if v is not None}}
    try:
        SamplingParams.build(**params)
    except OptionsError as error:
        raise ApiError(400, str(error)) from None
    return {**params, "timeout": server.request_timeout, "max_prompt_tokens": server.max_prompt_tokens}


async def bounded(daemon: Daemon, work: Any) -> Any:
    """Await ``work`` within ``request_timeout`` (a 504 past it), kernel errors as HTTP ones.
    Generations stop at their own deadline; this bounds everything else (waiting for a load)."""
    limit = daemon.config.server.request_timeout
    try:
        return await asyncio.wait_for(work, limit + 1.0)
    except TimeoutError:
        raise timed_out(limit) from None
    except Exception as error:
        raise api_error(error) from None


def router(daemon: Daemon) -> APIRouter:
    api = APIRouter()
    started = int(time.time())

    def sampling(body: GenerationBody) -> dict[str, Any]:
        """The library parameters of a generation request, refused here (400) when bad."""
        body.check()
        if body.n > daemon.config.server.max_choices:
            raise ApiError(400, f"n={body.n} is more than this server allows ({daemon.config.server.max_choices})",
                           param="n")
        return generation_params(daemon, body.max_completion_tokens or body.max_tokens, "max_tokens",
                                 body.sampling())

    def seeded(params: dict[str, Any], row: int) -> dict[str, Any]:
        """Choice ``row``'s parameters: its own seed stream when the request is seeded."""
        from llmk.sampling import row_seed

        return params if params.get("seed") is None else {**params, "seed": row_seed(params["seed"], row)}

    async def call(function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking call (embeddings) in a thread, bounded by ``request_timeout``."""
        return await bounded(daemon, asyncio.to_thread(function, *args, **kwargs))

    async def queued(stream: Any) -> Any:
        """A stream validated and queued, so that bad input is a 4xx before any header is sent."""
        await bounded(daemon, stream.start())
        return stream

    def finished(request: Request, result: Any) -> None:
        note(request, tokens_in=result.prompt_tokens, tokens_out=result.completion_tokens,
             finish_reason=result.finish_reason)
        if result.finish_reason == "timeout":
            raise timed_out(daemon.config.server.request_timeout)

    def stream(request: Request, events: AsyncIterator[str], streams: list[Any]) -> StreamingResponse:
        return StreamingResponse(_sse(request, events, streams, timeout=daemon.config.server.request_timeout),
                                 media_type="text/event-stream")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "llmk"}

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in daemon.kernel.names()]}

    @api.get("/v1/models/{name}")
    async def get_model(request: Request, name: str) -> dict[str, Any]:
        model_for(daemon, request, name)
        return model_card(name)

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatBody) -> Any:
        model = model_for(daemon, request, body.model)
        params = sampling(body)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tools = {"tools": body.tools, "tool_choice": body.tool_choice, "parallel_tool_calls": body.parallel_tool_calls}
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "object": "chat.completion", "created": created, "model": body.model}
        if body.stream:
            streams = [await queued(model.achat_stream(messages, **tools, **seeded(params, row)))
                       for row in range(body.n)]
            return stream(request, _chat_events(head, streams, body.include_usage), streams)
        results = await bounded(daemon, model.achat(messages, n=body.n, **tools, **params))
        results = results if isinstance(results, list) else [results]
        for result in results:
            finished(request, result)
        choices = []
        for i, result in enumerate(results):
            message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
            if result.tool_calls:
                message = {**message, "content": result.text or None,
                           "tool_calls": [call.as_openai() for call in result.tool_calls]}
            choices.append({"index": i, "message": message, "finish_reason": _finish(result.finish_reason),
                            "logprobs": chat_logprobs(result.logprobs)})
        completion = sum(r.completion_tokens for r in results)
        return {**head, "choices": choices, "usage": _usage(results[0].prompt_tokens, completion)}

    @api.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionBody) -> Any:
        model = model_for(daemon, request, body.model)
        params = sampling(body)
        prompts = body.prompts()
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": body.model}
        top = body.logprobs
        if body.stream:
            streams = [await queued(model.astream(prompt, **seeded(params, row)))
                       for prompt in prompts for row in range(body.n)]
            echoes = [await echo(model, prompt, top) if body.echo else None
                      for prompt in prompts for _ in range(body.n)]
            return stream(request, _completion_events(head, streams, echoes, body.n, body.include_usage), streams)
        results = await bounded(daemon, model.agenerate(prompts, n=body.n, **params))
        choices, prompt_tokens = [], 0
        for i, result in enumerate(results):
            finished(request, result)
            prompt_tokens += result.prompt_tokens if i % body.n == 0 else 0
            text, logprobs = result.text, None
            if body.echo:
                prompt_text, prompt_logprobs = await echo(model, prompts[i // body.n], top)
                text = prompt_text + text
                if top is not None:
                    logprobs = prompt_logprobs
            if top is not None:
                mine = completion_logprobs(result.logprobs or [], len(text) - len(result.text))
                logprobs = mine if logprobs is None else {k: logprobs[k] + mine[k] for k in mine}
            choices.append({"index": i, "text": text, "finish_reason": _finish(result.finish_reason),
                            "logprobs": logprobs})
        completion = sum(r.completion_tokens for r in results)
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion)}

    async def echo(model: Any, prompt: str | list[int], top: int | None) -> tuple[str, dict[str, Any] | None]:
        """The prompt's text for ``echo``, with its tokens' log-probabilities when asked."""
        if top is None:
            return (prompt if isinstance(prompt, str) else await call(model.decode, prompt)), None
        entries = await bounded(daemon, model.aprompt_logprobs(prompt, top))
        text = prompt if isinstance(prompt, str) else "".join(e.token for e in entries)
        return text, completion_logprobs(entries)

    @api.post("/v1/embeddings")
    async def embeddings(request: Request, body: EmbeddingBody) -> dict[str, Any]:
        model = model_for(daemon, request, body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if any(not t for t in texts):
            raise ApiError(400, "input: every text must be non-empty", param="input")
        limit = daemon.config.server.max_embedding_inputs
        if len(texts) > limit:
            raise ApiError(400, f"input: {len(texts)} texts; this server embeds at most {limit} per request",
                           param="input")
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


def _chunk(head: dict[str, Any], kind: str, choices: list[dict[str, Any]], usage: bool) -> str:
    payload = {**head, "object": kind, "choices": choices}
    if usage:
        payload["usage"] = None  # OpenAI: null on every chunk but the last, when usage is asked for
    return "data: " + json.dumps(payload) + "\n\n"


async def _merged(streams: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """The chunks of several streams as they come, each with its stream's index."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    items: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, source: Any) -> None:
        try:
            async for chunk in source:
                await items.put((index, chunk))
        except Exception as error:
            await items.put((index, error))
        await items.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await items.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _chat_events(head: dict[str, Any], streams: list[Any], usage: bool) -> AsyncIterator[Any]:
    """A chat's chunks: the role first, then content, tool calls and the finish per choice."""
    kind = "chat.completion.chunk"
    calls = [0] * len(streams)  # tool calls sent per choice, for their indexes
    completion = 0
    for index in range(len(streams)):
        yield _chunk(head, kind, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}], usage)
    async for index, chunk in _merged(streams):
        yield chunk
        completion += len(chunk.token_ids)
        delta: dict[str, Any] = {"content": chunk.text} if chunk.text else {}
        if chunk.tool_calls:
            delta["tool_calls"] = tool_call_deltas(chunk.tool_calls, calls[index])
            calls[index] += len(chunk.tool_calls)
        finish = _finish(chunk.finish_reason) if chunk.finish_reason else None
        if delta or finish or chunk.logprobs:
            yield _chunk(head, kind, [{"index": index, "delta": delta, "logprobs": chat_logprobs(chunk.logprobs),
                                       "finish_reason": finish}], usage)
    if usage:  # the choices share one prompt, counted once (as OpenAI counts it)
        yield _usage_chunk(head, kind, streams[0].prompt_tokens, completion)


async def _completion_events(head: dict[str, Any], streams: list[Any], echoes: list[Any], n: int,
                             usage: bool) -> AsyncIterator[Any]:
    """Completions' chunks, ``n`` choices per prompt, the echoed prompt first when asked."""
    kind = "text_completion"
    offsets = [0] * len(streams)
    completion = 0
    for index, echoed in enumerate(echoes):
        if echoed is not None:
            text, logprobs = echoed
            offsets[index] = len(text)
            yield _chunk(head, kind, [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}],
                         usage)
    async for index, chunk in _merged(streams):
        yield chunk
        completion += len(chunk.token_ids)
        logprobs = None
        if chunk.logprobs is not None:
            logprobs = completion_logprobs(chunk.logprobs, offsets[index])
        offsets[index] += len(chunk.text)
        finish = _finish(chunk.finish_reason) if chunk.finish_reason else None
        yield _chunk(head, kind, [{"index": index, "text": chunk.text, "logprobs": logprobs,
                                   "finish_reason": finish}], usage)
    if usage:
        yield _usage_chunk(head, kind, sum(s.prompt_tokens for s in streams[::n]), completion)


def _usage_chunk(head: dict[str, Any], kind: str, prompt: int, completion: int) -> str:
    return "data: " + json.dumps({**head, "object": kind, "choices": [], "usage": _usage(prompt, completion)}) + "\n\n"


async def _sse(request: Request, events: AsyncIterator[Any], streams: list[Any], *,
               timeout: float) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
    ``events`` yields the chunks it reads (for the accounting here) and the
    event strings to send. If the client goes away, the generator is closed,
    which cancels every generation of the request."""
    tokens_out = 0
    note(request, finish_reason="cancelled")  # unless the stream gets to its end
    try:
        async for item in events:
            if isinstance(item, str):
                yield item
                continue
            tokens_out += len(item.token_ids)
            if item.finish_reason == "timeout":
                raise timed_out(timeout)
            if item.finish_reason:
                note(request, finish_reason=item.finish_reason)
    except Exception as error:  # headers are sent: report it in the stream, OpenAI-style
        api = api_error(error)
        note(request, finish_reason=api.code or "error", error=api.message)
        yield "data: " + json.dumps({"error": {"message": api.message, "type": api.type, "code": api.code}}) + "\n\n"
    finally:  # also when the client went away: stop the generations now, not at garbage collection
        note(request, tokens_out=tokens_out)
        for stream in streams:
            await stream.aclose()
    yield "data: [DONE]\n\n"
