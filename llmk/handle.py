"""``ModelHandle``: what ``Kernel.load`` returns and host apps call.

A handle names a model rather than holding one: every call leases the version
that is current *when the call starts* and keeps it until the call (or stream)
ends. After a hot-swap the same handle serves the new version, while calls that
were already running finish on the old one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, overload

from llmk.errors import OptionsError
from llmk.generation import GenerationResult, SamplingParams, StreamChunk, Timing
from llmk.monitor import RequestRecord

if TYPE_CHECKING:
    from llmk.kernel import Kernel
    from llmk.lifecycle import ModelVersion

Messages = Sequence[dict[str, Any]]


def _check_messages(messages: Messages) -> list[dict[str, Any]]:
    if not messages:
        raise OptionsError("chat", "messages is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OptionsError("chat", f"messages[{i}] needs a string 'role'")
        if not isinstance(message.get("content"), str):
            raise OptionsError("chat", f"messages[{i}] needs a string 'content'")
    return [dict(m) for m in messages]


class ModelHandle:
    """Generate, chat, stream, embed and score with the model loaded as ``name``."""

    def __init__(self, kernel: Kernel, name: str):
        self._kernel = kernel
        self.name = name

    def __repr__(self) -> str:
        return f"<ModelHandle {self.name!r}>"

    @property
    def version(self) -> ModelVersion:
        """The version serving right now (a snapshot; it may be swapped later)."""
        return self._kernel._current(self.name)

    def status(self) -> dict[str, Any]:
        return self.version.status(current=True)

    @contextmanager
    def _lease(self) -> Iterator[tuple[ModelVersion, RequestRecord, Timing]]:
        """The current version, leased for one call, and the record of that call."""
        version = self._kernel._acquire(self.name)
        record, timing = RequestRecord(), Timing()
        try:
            yield version, record, timing
        except OptionsError:  # the caller's mistake, not the model's
            record.rejected = True
            raise
        except Exception:
            record.error = True
            raise
        finally:
            version.release()
            record.queue_wait = timing.queue_wait
            self._kernel.lifecycle.record(version, record)

    # -- generation ---------------------------------------------------------
    @overload
    def generate(self, prompt: str, **params: Any) -> GenerationResult: ...
    @overload
    def generate(self, prompt: list[str], **params: Any) -> list[GenerationResult]: ...

    def generate(self, prompt: str | list[str], *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None,
                 timeout: float | None = None) -> GenerationResult | list[GenerationResult]:
        """Complete a prompt, or a list of prompts as one batch (each result is
        the same as completing that prompt alone, greedy or with the same seed).

        ``timeout`` (seconds, queueing included) stops a generation that runs
        longer: its result ends with ``finish_reason="timeout"``."""
        params = SamplingParams.build(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                      seed=seed, stop=stop)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise OptionsError("generation", "no prompts given")
        with self._lease() as (version, record, timing):
            engine = version.engine
            ids = [engine.prompt_ids(p) for p in prompts]
            results = engine.generate(ids, [params] * len(ids), timing, timeout)
            _measure(record, results)
        return results[0] if isinstance(prompt, str) else results

    def chat(self, messages: Messages, *, timeout: float | None = None, **params: Any) -> GenerationResult:
        """Answer a conversation, formatted with the model's chat template."""
        with self._lease() as (version, record, timing):
            ids = version.engine.prompt_ids(version.engine.tokenizer.apply_chat_template(_check_messages(messages)))
            (result,) = version.engine.generate([ids], [SamplingParams.build(**params)], timing, timeout)
            _measure(record, [result])
        return result

    def stream(self, prompt: str, *, timeout: float | None = None, **params: Any) -> Iterator[StreamChunk]:
        """Yield the completion piece by piece as tokens are generated; closing
        the iterator stops the generation."""
        return self._stream(lambda engine: engine.prompt_ids(prompt), SamplingParams.build(**params), timeout)

    def chat_stream(self, messages: Messages, *, timeout: float | None = None,
                    **params: Any) -> Iterator[StreamChunk]:
        """``chat`` streamed piece by piece."""
        messages = _check_messages(messages)
        return self._stream(lambda engine: engine.prompt_ids(engine.tokenizer.apply_chat_template(messages)),
                            SamplingParams.build(**params), timeout)

    def _stream(self, make_ids: Any, params: SamplingParams, timeout: float | None) -> Iterator[StreamChunk]:
        # Validate and lease now, not at the first next(): errors surface at the call.
        version = self._kernel._acquire(self.name)
        try:
            ids = make_ids(version.engine)
        except Exception:
            version.release()
            raise
        stream = self._stream_leased(version, ids, params, timeout)
        # Consume the leading None: the generator is now inside its try block, so
        # close() or garbage collection releases the lease even if never iterated.
        next(stream)
        return stream

    def _stream_leased(self, version: ModelVersion, ids: list[int], params: SamplingParams,
                       timeout: float | None) -> Iterator[StreamChunk | None]:
        started = time.perf_counter()
        record, timing = RequestRecord(tokens_in=len(ids)), Timing()
        first = 0.0
        try:
            yield None  # consumed by _stream
            record.finish_reason = "cancelled"  # unless the stream reaches its end
            for chunk in version.engine.stream(ids, params, timing, timeout):
                if not record.tokens_out:
                    first = time.perf_counter() - started
                    record.ttft = first
                record.tokens_out += len(chunk.token_ids)
                if chunk.finish_reason is not None:
                    record.finish_reason = chunk.finish_reason
                yield chunk
        except Exception:
            record.error = True
            raise
        finally:
            version.release()
            if record.tokens_out > 1:
                record.tpot = (time.perf_counter() - started - first) / (record.tokens_out - 1)
            record.queue_wait = timing.queue_wait
            self._kernel.lifecycle.record(version, record)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is for this model (waits while it loads)."""
        version = self._kernel._acquire(self.name)
        try:
            return len(version.engine.tokenizer.encode(text))
        finally:
            version.release()

    # -- embeddings and scoring -----------------------------------------------
    def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """Sentence embeddings (L2-normalized), one vector per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lease() as (version, record, _):
            vectors = version.engine.embed(texts)
            record.tokens_in = len(texts)
        return vectors

    def perplexity(self, text: str) -> float:
        """Perplexity of the model on ``text`` (lower is better)."""
        with self._lease() as (version, _, _):
            return version.engine.perplexity(text)

    # -- async variants, for host apps running an event loop -------------------
    async def agenerate(self, prompt: str | list[str], **params: Any) -> Any:
        return await asyncio.to_thread(self.generate, prompt, **params)

    async def achat(self, messages: Messages, **params: Any) -> GenerationResult:
        return await asyncio.to_thread(self.chat, messages, **params)

    async def aembed(self, texts: str | Sequence[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed, texts)

    async def aperplexity(self, text: str) -> float:
        return await asyncio.to_thread(self.perplexity, text)

    def astream(self, prompt: str, **params: Any) -> AsyncIterator[StreamChunk]:
        return _to_async(lambda: self.stream(prompt, **params))

    def achat_stream(self, messages: Messages, **params: Any) -> AsyncIterator[StreamChunk]:
        return _to_async(lambda: self.chat_stream(messages, **params))


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


async def _to_async(make: Any) -> AsyncIterator[StreamChunk]:
    """Run a blocking chunk iterator in a worker thread; stopping early (or the
    consumer being cancelled) stops the generation after its current step."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            iterator = make()
            try:
                for chunk in iterator:
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                    if stop.is_set():
                        break
            finally:
                iterator.close()
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except BaseException as error:  # handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, error)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await asyncio.shield(worker)
