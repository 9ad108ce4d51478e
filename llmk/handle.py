"""``ModelHandle``: what ``Kernel.load`` returns and host apps call.

A handle names a model rather than holding one: every call leases the version
that is current *when the call starts* and keeps it until the call (or stream)
ends. After a hot-swap the same handle serves the new version, while calls that
were already running finish on the old one.

Every generating call has an async twin that runs on the caller's event loop:
it submits to the model's scheduler and awaits chunks handed over by the
scheduler thread, with no thread of its own (``llmk.scheduler``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, overload

from llmk.errors import OptionsError
from llmk.generation import Engine, GenerationResult, SamplingParams, StreamChunk, Timing
from llmk.monitor import RequestRecord

if TYPE_CHECKING:
    from llmk.kernel import Kernel
    from llmk.lifecycle import ModelVersion
    from llmk.sampling import LogitsProcessor

Messages = Sequence[dict[str, Any]]
#: Turns the leased engine into the prompt's token ids (``limit``: a cap on its length).
PromptIds = Callable[[Engine, "int | None"], list[int]]


def _check_messages(messages: Messages) -> list[dict[str, Any]]:
    if not messages:
        raise OptionsError("chat", "messages is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OptionsError("chat", f"messages[{i}] needs a string 'role'")
        if not isinstance(message.get("content"), str):
            raise OptionsError("chat", f"messages[{i}] needs a string 'content'")
    return [dict(m) for m in messages]


def _text_ids(prompt: str) -> PromptIds:
    return lambda engine, limit: engine.prompt_ids(prompt, limit)


def _chat_ids(messages: Messages) -> PromptIds:
    return lambda engine, limit: engine.prompt_ids(
        engine.tokenizer.apply_chat_template(_check_messages(messages)), limit)


class AsyncStream:
    """The chunks of a streamed generation, for ``async for``. ``await
    stream.start()`` validates and queues the request before the first chunk
    (a server does, to answer bad input before it sends headers); iterating
    starts it otherwise. ``aclose()`` (or leaving the loop) stops the generation."""

    def __init__(self, chunks: AsyncGenerator[StreamChunk | None, None]):
        self._chunks = chunks
        self._started = False

    async def start(self) -> AsyncStream:
        if not self._started:
            self._started = True
            await self._chunks.__anext__()  # runs up to the point where the request is queued
        return self

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamChunk:
        await self.start()
        chunk = await self._chunks.__anext__()
        assert chunk is not None
        return chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()


class ModelHandle:
    """Generate, chat, stream, embed and score with the model loaded as ``name``.

    Generation calls take ``max_tokens``, ``temperature``, ``top_p``, ``top_k``,
    ``seed``, ``stop``, ``timeout`` (seconds, queueing included: the generation
    stops with ``finish_reason="timeout"``), ``logits_processors`` (run on each
    step's logits before sampling: ``llmk.sampling.TokenMask`` constrains
    tokens) and ``max_prompt_tokens`` (refuse longer prompts).
    """

    def __init__(self, kernel: Kernel, name: str):
        self._kernel = kernel
        self.name = name

    def __repr__(self) -> str:
        return f"<ModelHandle {self.name!r}>"

    @property
    def version(self) -> ModelVersion:
        """The version serving right now (a snapshot; it may be swapped later)."""
        return self._kernel.lifecycle.current(self.name)

    def status(self) -> dict[str, Any]:
        return self.version.status(current=True)

    # -- leases ---------------------------------------------------------------
    def _acquire(self) -> ModelVersion:
        return self._kernel.lifecycle.acquire(self.name)

    async def _aacquire(self) -> ModelVersion:
        """Lease without blocking the event loop (a thread waits only while the model loads)."""
        version = self._kernel.lifecycle.try_acquire(self.name)
        return version if version is not None else await asyncio.to_thread(self._acquire)

    def _finished(self, version: ModelVersion, record: RequestRecord, timing: Timing) -> None:
        version.release()
        record.queue_wait = timing.queue_wait
        self._kernel.lifecycle.record(version, record)

    @contextmanager
    def _recording(self, version: ModelVersion) -> Iterator[tuple[RequestRecord, Timing]]:
        """The record of one call on a leased version; the lease ends with it."""
        record, timing = RequestRecord(), Timing()
        try:
            yield record, timing
        except OptionsError:  # the caller's mistake, not the model's
            record.rejected = True
            raise
        except Exception:
            record.error = True
            raise
        finally:
            self._finished(version, record, timing)

    # -- generation ---------------------------------------------------------
    @overload
    def generate(self, prompt: str, **params: Any) -> GenerationResult: ...
    @overload
    def generate(self, prompt: list[str], **params: Any) -> list[GenerationResult]: ...

    def generate(self, prompt: str | list[str], *, timeout: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                 **params: Any) -> GenerationResult | list[GenerationResult]:
        """Complete a prompt, or a list of prompts as one batch (each result is
        the same as completing that prompt alone, greedy or with the same seed)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        version = self._acquire()
        with self._recording(version) as (record, timing):
            sampling = SamplingParams.build(**params)
            if not prompts:
                raise OptionsError("generation", "no prompts given")
            engine = version.engine
            ids = [engine.prompt_ids(p, max_prompt_tokens) for p in prompts]
            results = engine.generate(ids, [sampling] * len(ids), timing, timeout, logits_processors)
            _measure(record, results)
        return results[0] if isinstance(prompt, str) else results

    def chat(self, messages: Messages, *, timeout: float | None = None,
             logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
             **params: Any) -> GenerationResult:
        """Answer a conversation, formatted with the model's chat template."""
        version = self._acquire()
        with self._recording(version) as (record, timing):
            sampling = SamplingParams.build(**params)
            ids = _chat_ids(messages)(version.engine, max_prompt_tokens)
            (result,) = version.engine.generate([ids], [sampling], timing, timeout, logits_processors)
            _measure(record, [result])
        return result

    def stream(self, prompt: str, *, timeout: float | None = None,
               logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
               **params: Any) -> Iterator[StreamChunk]:
        """Yield the completion piece by piece as tokens are generated; closing
        the iterator stops the generation. Bad input raises here, at the call."""
        return self._stream(_text_ids(prompt), params, timeout, logits_processors, max_prompt_tokens)

    def chat_stream(self, messages: Messages, *, timeout: float | None = None,
                    logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                    **params: Any) -> Iterator[StreamChunk]:
        """``chat`` streamed piece by piece."""
        return self._stream(_chat_ids(messages), params, timeout, logits_processors, max_prompt_tokens)

    def _stream(self, make_ids: PromptIds, params: dict[str, Any], timeout: float | None,
                processors: Sequence[LogitsProcessor], limit: int | None) -> Iterator[StreamChunk]:
        stream = self._stream_leased(make_ids, params, timeout, processors, limit)
        # Run up to the leading None: the request is validated and queued, and the
        # generator is inside its try block, so close() or garbage collection
        # releases the lease even if it is never iterated.
        next(stream)
        return stream  # type: ignore[return-value]

    def _stream_leased(self, make_ids: PromptIds, params: dict[str, Any], timeout: float | None,
                       processors: Sequence[LogitsProcessor], limit: int | None) -> Iterator[StreamChunk | None]:
        version = self._acquire()
        with self._recording(version) as (record, timing):
            started = time.perf_counter()
            engine = version.engine
            sampling = SamplingParams.build(**params)
            ids = make_ids(engine, limit)
            record.tokens_in = len(ids)
            request = engine.submit(ids, sampling, timeout, processors)
            try:
                yield None  # consumed by _stream
                record.finish_reason = "cancelled"  # unless the stream reaches its end
                for chunk in request:
                    timing.queue_wait = request.queue_wait
                    _count(record, chunk, started)
                    yield chunk
            finally:
                request.cancel()  # a no-op once finished; otherwise the reader went away
                _pace(record, started)

    # -- async generation: on the caller's event loop, no thread per request -------------
    async def agenerate(self, prompt: str | list[str], *, timeout: float | None = None,
                        logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                        **params: Any) -> Any:
        """``generate`` for a coroutine."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        version = await self._aacquire()
        with self._recording(version) as (record, timing):
            sampling = SamplingParams.build(**params)
            if not prompts:
                raise OptionsError("generation", "no prompts given")
            engine = version.engine
            ids = [engine.prompt_ids(p, max_prompt_tokens) for p in prompts]
            results = await engine.agenerate(ids, [sampling] * len(ids), timing, timeout, logits_processors)
            _measure(record, results)
        return results[0] if isinstance(prompt, str) else results

    async def achat(self, messages: Messages, *, timeout: float | None = None,
                    logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                    **params: Any) -> GenerationResult:
        """``chat`` for a coroutine."""
        version = await self._aacquire()
        with self._recording(version) as (record, timing):
            sampling = SamplingParams.build(**params)
            ids = _chat_ids(messages)(version.engine, max_prompt_tokens)
            (result,) = await version.engine.agenerate([ids], [sampling], timing, timeout, logits_processors)
            _measure(record, [result])
        return result

    def astream(self, prompt: str, *, timeout: float | None = None,
                logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                **params: Any) -> AsyncStream:
        """``stream`` for a coroutine: ``async for piece in handle.astream(...)``."""
        return AsyncStream(self._astream_leased(_text_ids(prompt), params, timeout, logits_processors,
                                                max_prompt_tokens))

    def achat_stream(self, messages: Messages, *, timeout: float | None = None,
                     logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                     **params: Any) -> AsyncStream:
        """``chat_stream`` for a coroutine."""
        return AsyncStream(self._astream_leased(_chat_ids(messages), params, timeout, logits_processors,
                                                max_prompt_tokens))

    async def _astream_leased(self, make_ids: PromptIds, params: dict[str, Any], timeout: float | None,
                              processors: Sequence[LogitsProcessor],
                              limit: int | None) -> AsyncGenerator[StreamChunk | None, None]:
        version = await self._aacquire()
        with self._recording(version) as (record, timing):
            started = time.perf_counter()
            engine = version.engine
            sampling = SamplingParams.build(**params)
            ids = make_ids(engine, limit)
            record.tokens_in = len(ids)
            request = engine.submit(ids, sampling, timeout, processors, asyncio.get_running_loop())
            try:
                yield None  # consumed by AsyncStream.start
                record.finish_reason = "cancelled"
                async for chunk in request:
                    timing.queue_wait = request.queue_wait
                    _count(record, chunk, started)
                    yield chunk
            finally:
                request.cancel()
                _pace(record, started)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is for this model (waits while it loads)."""
        version = self._acquire()
        try:
            return len(version.engine.tokenizer.encode(text))
        finally:
            version.release()

    # -- embeddings and scoring -----------------------------------------------
    def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """Sentence embeddings (L2-normalized), one vector per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        version = self._acquire()
        with self._recording(version) as (record, _):
            vectors = version.engine.embed(texts)
            record.tokens_in = len(texts)
        return vectors

    def perplexity(self, text: str) -> float:
        """Perplexity of the model on ``text`` (lower is better)."""
        version = self._acquire()
        with self._recording(version):
            return version.engine.perplexity(text)

    async def aembed(self, texts: str | Sequence[str]) -> list[list[float]]:
        # The runner computes while a thread waits: embeddings are not scheduled in steps.
        return await asyncio.to_thread(self.embed, texts)

    async def aperplexity(self, text: str) -> float:
        return await asyncio.to_thread(self.perplexity, text)


def _count(record: RequestRecord, chunk: StreamChunk, started: float) -> None:
    if chunk.token_ids and not record.tokens_out:
        record.ttft = time.perf_counter() - started
    record.tokens_out += len(chunk.token_ids)
    if chunk.finish_reason is not None:
        record.finish_reason = chunk.finish_reason


def _pace(record: RequestRecord, started: float) -> None:
    if record.tokens_out > 1 and record.ttft is not None:
        record.tpot = (time.perf_counter() - started - record.ttft) / (record.tokens_out - 1)


def _measure(record: RequestRecord, results: list[GenerationResult]) -> None:
    """Tokens and latencies of a (batched) generation, as one request."""
    record.tokens_in = sum(r.prompt_tokens for r in results)
    record.tokens_out = sum(r.completion_tokens for r in results)
    reasons = {r.finish_reason for r in results}
    record.finish_reason = reasons.pop() if len(reasons) == 1 else None
    record.ttft = min(r.first_token_seconds for r in results)
    paced = [(r.seconds - r.first_token_seconds) / (r.completion_tokens - 1)
             for r in results if r.completion_tokens > 1]
    record.tpot = sum(paced) / len(paced) if paced else None

