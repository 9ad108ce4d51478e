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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmk.errors import OptionsError
from llmk.generation import Engine, GenerationResult, SamplingParams, StreamChunk, Timing
from llmk.monitor import RequestRecord

if TYPE_CHECKING:
    from llmk.kernel import Kernel
    from llmk.lifecycle import ModelVersion
    from llmk.sampling import LogitsProcessor
    from llmk.tools import ToolSet

Messages = Sequence[dict[str, Any]]


@dataclass
class Prepared:
    """A request made ready for the engine: its prompt ids, its sampling
    parameters (a required tool call adds its grammar) and its tools, if any."""

    ids: list[int]
    params: SamplingParams
    tools: ToolSet | None = None


#: Turns the leased engine and the caller's sampling parameters into a ``Prepared`` request.
Prepare = Callable[[Engine, SamplingParams], Prepared]


def _single(prompt: Any) -> bool:
    """One prompt (text or token ids), as opposed to a list of them."""
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                       and all(isinstance(t, int) for t in prompt))


def _text(prompt: str | list[int], limit: int | None) -> Prepare:
    return lambda engine, params: Prepared(engine.prompt_ids(prompt, limit), params)


def _chat(messages: Messages, limit: int | None, tools: Any = None, tool_choice: Any = None,
          parallel_tool_calls: bool | None = None) -> Prepare:
    from llmk.constraints import schema_prompt
    from llmk.tools import render_messages, tool_grammar, tool_set, tools_in_template

    def prepare(engine: Engine, params: SamplingParams) -> Prepared:
        # Checked here, inside the call's record, so that a refused request counts as one.
        if not isinstance(messages, (list, tuple)) or not messages:
            raise OptionsError("messages", "give a non-empty list of messages")
        toolset = tool_set(tools, tool_choice, parallel_tool_calls)
        template = engine.tokenizer.chat_template
        rendered, extra = render_messages(list(messages), toolset, template_has_tools=tools_in_template(template))
        grammar = tool_grammar(toolset) if toolset is not None else None
        if grammar is not None:  # a required call: the grammar makes even a small model's call valid
            if params.constrained:
                raise OptionsError("tool_choice", "a required tool call cannot be combined with a response "
                                   "format, json_schema, regex or grammar")
            params = params.model_copy(update={"grammar": grammar})
        if params.json_schema is not None and params.json_schema != {"type": "object"}:  # (not JSON mode)
            rendered = _with_system(rendered, schema_prompt(params.json_schema))
        ids = engine.prompt_ids(engine.tokenizer.apply_chat_template(rendered, **extra), limit)
        return Prepared(ids, params, toolset)

    return prepare


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``text`` at the end of the first system message, or as a new one in front."""
    for i, message in enumerate(messages):
        if message["role"] == "system":
            content = message.get("content") or ""
            return [*messages[:i], {**message, "content": f"{content}\n\n{text}" if content else text},
                    *messages[i + 1:]]
    return [{"role": "system", "content": text}, *messages]


def _read_tools(result: GenerationResult, tools: ToolSet | None) -> GenerationResult:
    """Move the tool calls out of a finished answer's text."""
    if tools is None or tools.choice == "none":
        return result
    from llmk.tools import parse_tool_calls

    content, calls = parse_tool_calls(result.text)
    if calls:
        result.text, result.tool_calls = content or "", calls
        if result.finish_reason == "stop":
            result.finish_reason = "tool_calls"
    return result


class _ToolChunks:
    """Rewrites a stream's chunks so that tool calls arrive as ``tool_calls``, never as text."""

    def __init__(self, tools: ToolSet | None):
        from llmk.tools import ToolCallStream

        self.parser = ToolCallStream() if tools is not None and tools.choice != "none" else None
        self.called = False

    def __call__(self, chunk: StreamChunk) -> StreamChunk:
        if self.parser is None:
            return chunk
        text, calls = self.parser.feed(chunk.text)
        if chunk.finish_reason is not None:
            rest, more = self.parser.finish()
            text, calls = text + rest, calls + more
        self.called = self.called or bool(calls)
        reason = "tool_calls" if chunk.finish_reason == "stop" and self.called else chunk.finish_reason
        return StreamChunk(text, chunk.token_ids, reason, chunk.logprobs, calls)


class AsyncStream:
    """The chunks of a streamed generation, for ``async for``. ``await
    stream.start()`` validates and queues the request before the first chunk
    (a server does, to answer bad input before it sends headers); iterating
    starts it otherwise. ``aclose()`` (or leaving the loop) stops the generation."""

    def __init__(self, chunks_of: Callable[[AsyncStream], AsyncGenerator[StreamChunk | None, None]]):
        #: The prompt's length in tokens, known once started.
        self.prompt_tokens = 0
        self._chunks = chunks_of(self)
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

    Generation calls take the fields of ``SamplingParams`` (``max_tokens``,
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, the penalties,
    ``logit_bias``, ``logprobs``/``top_logprobs``, and one constraint:
    ``json_schema``, ``regex`` or ``grammar``), ``timeout`` (seconds, queueing
    included: the generation stops with ``finish_reason="timeout"``),
    ``logits_processors`` (stateless, run on each step's logits before sampling:
    ``llmk.sampling.TokenMask`` constrains tokens), ``max_prompt_tokens``
    (refuse longer prompts) and ``adapter`` (one of the model's ``adapters``, which
    ``NAME:ADAPTER``'s handle uses by default; ``adapter=None`` is the model alone).
    """

    def __init__(self, kernel: Kernel, name: str, adapter: str | None = None):
        self._kernel = kernel
        self.name = name
        self.adapter = adapter

    def __repr__(self) -> str:
        return f"<ModelHandle {self.name!r}{'' if self.adapter is None else f' adapter={self.adapter!r}'}>"

    @property
    def version(self) -> ModelVersion:
        """The version serving right now (a snapshot; it may be swapped later)."""
        return self._kernel.lifecycle.current(self.name)

    def status(self) -> dict[str, Any]:
        return self.version.status(current=True)

    # -- leases ---------------------------------------------------------------
    def _route(self, params: dict[str, Any]) -> tuple[str, str | None]:
        """The name whose version serves a call, and the adapter its engine applies
        (``params``' ``adapter``, taken out, else this handle's)."""
        return self._kernel.route(self.name, params.pop("adapter", self.adapter))

    def _acquire(self, params: dict[str, Any] | None = None) -> tuple[ModelVersion, str | None]:
        target, adapter = self._route({} if params is None else params)
        return self._kernel.lifecycle.acquire(target), adapter

    async def _aacquire(self, params: dict[str, Any] | None = None) -> tuple[ModelVersion, str | None]:
        """Lease without blocking the event loop (a thread waits only while the model loads)."""
        target, adapter = self._route({} if params is None else params)
        version = self._kernel.lifecycle.try_acquire(target)
        if version is None:
            version = await asyncio.to_thread(self._kernel.lifecycle.acquire, target)
        return version, adapter

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
    def generate(self, prompt: str | list[int] | list[str] | list[list[int]], *, n: int = 1,
                 timeout: float | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                 max_prompt_tokens: int | None = None, **params: Any) -> Any:
        """Complete a prompt (text or token ids): a ``GenerationResult``. A list of
        prompts, or ``n`` > 1 choices, run as one batch and give a list, prompt by
        prompt, its choices together (each result is the same as completing that
        prompt alone, greedy or with the same seed)."""
        single = _single(prompt)
        prompts = [prompt] if single else list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise OptionsError("generation", "no prompts given")
        results = self._run([_text(p, max_prompt_tokens) for p in prompts], n, params, timeout, logits_processors)
        return results[0] if single and n == 1 else results

    def chat(self, messages: Messages, *, n: int = 1, tools: Any = None, tool_choice: Any = None,
             parallel_tool_calls: bool | None = None, timeout: float | None = None,
             logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
             **params: Any) -> Any:
        """Answer a conversation, formatted with the model's chat template: a
        ``GenerationResult`` (a list of ``n`` when ``n`` > 1). With ``tools``
        (OpenAI's shape), calls in the answer come back as ``tool_calls``."""
        prepare = _chat(messages, max_prompt_tokens, tools, tool_choice, parallel_tool_calls)
        results = self._run([prepare], n, params, timeout, logits_processors)
        return results[0] if n == 1 else results

    def _run(self, prepares: list[Prepare], n: int, params: dict[str, Any], timeout: float | None,
             processors: Sequence[LogitsProcessor]) -> list[GenerationResult]:
        version, adapter = self._acquire(params)
        with self._recording(version) as (record, timing):
            prepared = _expand(version.engine, prepares, n, params)
            results = version.engine.generate([p.ids for p in prepared], [p.params for p in prepared], timing,
                                              timeout, processors, adapter)
            results = [_read_tools(r, p.tools) for r, p in zip(results, prepared)]
            _measure(record, results)
        return results

    async def agenerate(self, prompt: str | list[int] | list[str] | list[list[int]], *, n: int = 1,
                        timeout: float | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                        max_prompt_tokens: int | None = None, **params: Any) -> Any:
        """``generate`` for a coroutine."""
        single = _single(prompt)
        prompts = [prompt] if single else list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise OptionsError("generation", "no prompts given")
        results = await self._arun([_text(p, max_prompt_tokens) for p in prompts], n, params, timeout,
                                   logits_processors)
        return results[0] if single and n == 1 else results

    async def achat(self, messages: Messages, *, n: int = 1, tools: Any = None, tool_choice: Any = None,
                    parallel_tool_calls: bool | None = None, timeout: float | None = None,
                    logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                    **params: Any) -> Any:
        """``chat`` for a coroutine."""
        prepare = _chat(messages, max_prompt_tokens, tools, tool_choice, parallel_tool_calls)
        results = await self._arun([prepare], n, params, timeout, logits_processors)
        return results[0] if n == 1 else results

    async def _arun(self, prepares: list[Prepare], n: int, params: dict[str, Any], timeout: float | None,
                    processors: Sequence[LogitsProcessor]) -> list[GenerationResult]:
        version, adapter = await self._aacquire(params)
        with self._recording(version) as (record, timing):
            prepared = _expand(version.engine, prepares, n, params)
            results = await version.engine.agenerate([p.ids for p in prepared], [p.params for p in prepared],
                                                     timing, timeout, processors, adapter)
            results = [_read_tools(r, p.tools) for r, p in zip(results, prepared)]
            _measure(record, results)
        return results

    def stream(self, prompt: str | list[int], *, timeout: float | None = None,
               logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
               **params: Any) -> Iterator[StreamChunk]:
        """Yield the completion piece by piece as tokens are generated; closing
        the iterator stops the generation. Bad input raises here, at the call."""
        return self._stream(_text(prompt, max_prompt_tokens), params, timeout, logits_processors)

    def chat_stream(self, messages: Messages, *, tools: Any = None, tool_choice: Any = None,
                    parallel_tool_calls: bool | None = None, timeout: float | None = None,
                    logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                    **params: Any) -> Iterator[StreamChunk]:
        """``chat`` streamed piece by piece; tool calls come in chunks' ``tool_calls``."""
        prepare = _chat(messages, max_prompt_tokens, tools, tool_choice, parallel_tool_calls)
        return self._stream(prepare, params, timeout, logits_processors)

    def _stream(self, prepare: Prepare, params: dict[str, Any], timeout: float | None,
                processors: Sequence[LogitsProcessor]) -> Iterator[StreamChunk]:
        stream = self._stream_leased(prepare, params, timeout, processors)
        # Run up to the leading None: the request is validated and queued, and the
        # generator is inside its try block, so close() or garbage collection
        # releases the lease even if it is never iterated.
        next(stream)
        return stream  # type: ignore[return-value]

    def _stream_leased(self, prepare: Prepare, params: dict[str, Any], timeout: float | None,
                       processors: Sequence[LogitsProcessor]) -> Iterator[StreamChunk | None]:
        version, adapter = self._acquire(params)
        with self._recording(version) as (record, timing):
            started = time.perf_counter()
            engine = version.engine
            (prepared,) = _expand(engine, [prepare], 1, params)
            record.tokens_in = len(prepared.ids)
            request = engine.submit(prepared.ids, prepared.params, timeout, processors, adapter=adapter)
            rewrite = _ToolChunks(prepared.tools)
            try:
                yield None  # consumed by _stream
                record.finish_reason = "cancelled"  # unless the stream reaches its end
                for chunk in request:
                    timing.queue_wait = request.queue_wait
                    _count(record, chunk, started)
                    yield rewrite(chunk)
            finally:
                request.cancel()  # a no-op once finished; otherwise the reader went away
                _pace(record, started)

    def astream(self, prompt: str | list[int], *, timeout: float | None = None,
                logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                **params: Any) -> AsyncStream:
        """``stream`` for a coroutine: ``async for piece in handle.astream(...)``."""
        prepare = _text(prompt, max_prompt_tokens)
        return AsyncStream(lambda stream: self._astream_leased(stream, prepare, params, timeout, logits_processors))

    def achat_stream(self, messages: Messages, *, tools: Any = None, tool_choice: Any = None,
                     parallel_tool_calls: bool | None = None, timeout: float | None = None,
                     logits_processors: Sequence[LogitsProcessor] = (), max_prompt_tokens: int | None = None,
                     **params: Any) -> AsyncStream:
        """``chat_stream`` for a coroutine."""
        prepare = _chat(messages, max_prompt_tokens, tools, tool_choice, parallel_tool_calls)
        return AsyncStream(lambda stream: self._astream_leased(stream, prepare, params, timeout, logits_processors))

    async def _astream_leased(self, stream: AsyncStream, prepare: Prepare, params: dict[str, Any],
                              timeout: float | None,
                              processors: Sequence[LogitsProcessor]) -> AsyncGenerator[StreamChunk | None, None]:
        version, adapter = await self._aacquire(params)
        with self._recording(version) as (record, timing):
            started = time.perf_counter()
            engine = version.engine
            (prepared,) = _expand(engine, [prepare], 1, params)
            record.tokens_in = stream.prompt_tokens = len(prepared.ids)
            request = engine.submit(prepared.ids, prepared.params, timeout, processors, asyncio.get_running_loop(),
                                    adapter)
            rewrite = _ToolChunks(prepared.tools)
            try:
                yield None  # consumed by AsyncStream.start
                record.finish_reason = "cancelled"
                async for chunk in request:
                    timing.queue_wait = request.queue_wait
                    _count(record, chunk, started)
                    yield rewrite(chunk)
            finally:
                request.cancel()
                _pace(record, started)

    async def aprompt_logprobs(self, prompt: str | list[int], top: int = 0) -> list[Any]:
        """Each prompt token's ``TokenLogprob`` given those before it (the first's ``logprob`` is ``None``)."""
        version, adapter = await self._aacquire()
        with self._recording(version):
            engine = version.engine
            ids = engine.prompt_ids(prompt)
            return await asyncio.to_thread(engine.prompt_logprobs, ids, top, adapter)

    def decode(self, token_ids: list[int]) -> str:
        """The text of token ids (special tokens left out)."""
        version, _ = self._acquire()
        try:
            return version.engine.tokenizer.decode(list(token_ids))
        finally:
            version.release()

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is for this model (waits while it loads)."""
        version, _ = self._acquire()
        try:
            return len(version.engine.tokenizer.encode(text))
        finally:
            version.release()

    # -- embeddings and scoring -----------------------------------------------
    def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """Sentence embeddings (L2-normalized), one vector per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        version, _ = self._acquire()
        with self._recording(version) as (record, _):
            vectors = version.engine.embed(texts)
            record.tokens_in = len(texts)
        return vectors

    def perplexity(self, text: str, *, adapter: str | None = None) -> float:
        """Perplexity of the model (with this handle's adapter, or ``adapter``) on ``text`` (lower is better)."""
        version, served = self._acquire({} if adapter is None else {"adapter": adapter})
        with self._recording(version):
            return version.engine.perplexity(text, served)

    async def aembed(self, texts: str | Sequence[str]) -> list[list[float]]:
        # The runner computes while a thread waits: embeddings are not scheduled in steps.
        return await asyncio.to_thread(self.embed, texts)

    async def aperplexity(self, text: str, *, adapter: str | None = None) -> float:
        return await asyncio.to_thread(lambda: self.perplexity(text, adapter=adapter))


def _expand(engine: Engine, prepares: list[Prepare], n: int, params: dict[str, Any]) -> list[Prepared]:
    """Every prompt's request, each repeated ``n`` times with its own seed stream."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise OptionsError("n", f"n must be an integer from 1 to 128, not {n!r}")
    sampling = SamplingParams.build(**params)
    out = []
    for prepare in prepares:
        prepared = prepare(engine, sampling)
        out.extend(Prepared(prepared.ids, prepared.params.for_row(row), prepared.tools) for row in range(n))
    return out


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

