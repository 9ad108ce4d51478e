"""The engine of one loaded model: generation, scoring and embedding on any ``Runner``.

Backends only produce logits; everything a user can observe about the output —
sampling, seeds, stop sequences, streaming, finish reasons, perplexity, pooling —
happens in the core, once, so all backends behave identically. Generations run
through the model's ``Scheduler`` (``llmk.scheduler``) over its KV cache
(``llmk.kv``), drafting tokens ahead where that pays (``llmk.speculative``);
scoring and embedding take the runner lock between its steps.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmk.errors import OptionsError, UnsupportedError
from llmk.logs import get_logger
from llmk.sampling import LogitsProcessor, SamplingParams, TokenLogprob, TokenMask, sample
from llmk.sequence import Adapter, FinishReason, StreamChunk
from llmk.tokenizer import Tokenizer

if TYPE_CHECKING:
    import numpy as np

    from llmk.backend import Runner
    from llmk.kv import KVCacheManager
    from llmk.scheduler import Request, Scheduler
    from llmk.speculative import SpeculativeConfig, Speculator
    from llmk.tools import ToolCall

log = get_logger("llmk.generation")

__all__ = ["Engine", "FinishReason", "GenerationResult", "LogitsProcessor", "SamplingParams", "StreamChunk",
           "IDLE_BACKLOG", "PromptTooLongError", "Timing", "TokenLogprob", "TokenMask", "default_kv_tokens", "sample"]


#: ``Engine.backlog()`` of a model with nothing to do.
IDLE_BACKLOG = {"queued": 0, "running": 0, "prefilling": 0, "prefill_tokens_pending": 0}


def default_kv_tokens(max_batch_size: int, max_context: int) -> int:
    """The KV cache's size when the spec does not set one: 1,024 positions per
    sequence in flight (llama.cpp's server splits ``-c 16384 -np 16`` the same way),
    at least one full context up to 8,192 (one long prompt must fit), at most a full
    context per sequence."""
    return min(max_batch_size * max_context, max(max_batch_size * 1024, min(max_context, 8192)))


@dataclass
class GenerationResult:
    """One finished completion."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    queue_wait: float = 0.0
    #: One per token, when the request asked for ``logprobs``.
    logprobs: list[TokenLogprob] | None = None
    prompt_ids: list[int] = field(default_factory=list)
    #: The tool calls parsed from the answer (chat with ``tools``); ``text`` keeps the rest.
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def __str__(self) -> str:
        return self.text


@dataclass
class Timing:
    """What a generation measured for its request's record."""

    queue_wait: float = 0.0  # seconds in the queue before the scheduler admitted it


def _result(request: Request, chunks: list[StreamChunk]) -> GenerationResult:
    ids = [t for c in chunks for t in c.token_ids]
    reason = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), "cancelled")
    logprobs = [p for c in chunks for p in c.logprobs or ()] if request.sequence.params.logprobs else None
    return GenerationResult("".join(c.text for c in chunks), ids, reason, len(request.sequence.prompt_ids),
                            request.seconds, request.first_token_seconds, request.queue_wait, logprobs,
                            list(request.sequence.prompt_ids))


class Engine:
    """A runner plus its tokenizer: what one loaded model version can do.

    For generation models the first request creates the KV cache
    (``kv_cache_tokens`` positions, default ``default_kv_tokens``) and the
    scheduler: up to ``max_batch_size`` sequences in flight, ``prefill_chunk``
    prompt tokens per step, ``max_queue`` requests waiting, the prefix cache on
    unless ``prefix_caching`` is off. ``speculative`` says how to draft tokens
    ahead (default: n-gram prompt lookup); ``draft`` is the draft model's runner
    for ``method: draft`` (the engine then owns and closes it, and gives it a KV
    cache of its own with as many positions as the target's).
    """

    def __init__(self, runner: Runner, tokenizer: Tokenizer, *, name: str = "model", max_batch_size: int = 8,
                 max_queue: int = 1024, prefill_chunk: int = 256, kv_cache_tokens: int | None = None,
                 prefix_caching: bool = True, max_queued_prompt_tokens: int | None = None,
                 speculative: SpeculativeConfig | None = None, draft: Runner | None = None):
        from llmk.speculative import SpeculativeConfig

        self.runner = runner
        self.tokenizer = tokenizer
        self.lock = threading.Lock()  # held for each runner call
        self.name, self.max_batch_size, self.max_queue = name, max_batch_size, max_queue
        self.prefill_chunk, self.prefix_caching = prefill_chunk, prefix_caching
        self.max_queued_prompt_tokens = max_queued_prompt_tokens
        self.kv_cache_tokens = kv_cache_tokens or default_kv_tokens(max_batch_size, runner.max_context)
        self.speculative = speculative or SpeculativeConfig(method="draft" if draft is not None else "ngram")
        self.draft = draft
        self._scheduler: Scheduler | None = None
        self._kv: KVCacheManager | None = None
        self._scheduler_lock = threading.Lock()
        #: LoRA adapters applied per request in this engine's batches (``set_adapters``).
        self.adapters: dict[str, Adapter] = {}

    @property
    def batches_adapters(self) -> bool:
        """The runner applies adapters per row (``Runner.load_adapter``): requests for
        different adapters share this engine's batches."""
        from llmk.backend import Runner

        return type(self.runner).load_adapter is not Runner.load_adapter

    def set_adapters(self, adapters: dict[str, str]) -> None:
        """Serve exactly ``adapters`` (name -> peft directory): new ones are loaded into
        the runner first (a failure changes nothing), then the set is replaced at once.
        Requests already running keep the weights they started with."""
        import os

        loaded = {}
        for name, path in adapters.items():
            current = self.adapters.get(name)
            if current is not None and current.path == path:
                loaded[name] = current
                continue
            with self.lock:
                weights = self.runner.load_adapter(Path(path))
            loaded[name] = Adapter(name, path, weights, root=os.urandom(16))
            log.info("engine.adapter_loaded", model=self.name, adapter=name, path=path)
        self.adapters = loaded

    def adapter(self, name: str | None) -> Adapter | None:
        """The adapter a request names (``None``: the model alone)."""
        if name is None:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            raise OptionsError("adapter", f"model {self.name!r} has no adapter {name!r}; it has: "
                                          f"{', '.join(sorted(self.adapters)) or 'none'}")
        return adapter

    @property
    def scheduler(self) -> Scheduler:
        """The model's scheduler, started (with its KV cache) on first use."""
        from llmk.kv import KVCacheManager
        from llmk.scheduler import Scheduler

        with self._scheduler_lock:
            if self._scheduler is None:
                if self.runner.task != "generate" or self.runner.kv_layout is None:
                    raise UnsupportedError("this model embeds text; it does not generate")
                layout = self.runner.kv_layout
                kv = KVCacheManager(layout, capacity_blocks=-(-self.kv_cache_tokens // layout.block_size),
                                    num_slots=self.max_batch_size, max_context=self.runner.max_context,
                                    prefix_caching=self.prefix_caching, copy=self._copy_blocks,
                                    release=self._release_blocks)
                with self.lock:
                    self.runner.allocate_cache(kv.num_blocks, self.max_batch_size, kv.capacity)
                self._kv = kv
                self._scheduler = Scheduler(self.runner, self.tokenizer, kv, runner_lock=self.lock, name=self.name,
                                            max_batch_size=self.max_batch_size, max_queue=self.max_queue,
                                            prefill_chunk=self.prefill_chunk,
                                            max_queued_prompt_tokens=self.max_queued_prompt_tokens,
                                            speculator=self._speculator())
            return self._scheduler

    def _speculator(self) -> Speculator:
        """The scheduler's drafting: n-gram lookup, or the draft model on a KV cache of
        its own in the target's slots (as many positions, plus a block per slot for rounding)."""
        from llmk.kv import KVCacheManager
        from llmk.speculative import DraftModel, Speculator

        draft = self.draft
        if draft is None or draft.kv_layout is None or self.speculative.method != "draft":
            return Speculator(self.speculative, draft_cost=self.runner.draft_token_cost)
        layout = draft.kv_layout
        kv = KVCacheManager(layout, capacity_blocks=-(-self.kv_cache_tokens // layout.block_size) + self.max_batch_size,
                            num_slots=self.max_batch_size, max_context=min(draft.max_context, self.runner.max_context),
                            prefix_caching=self.prefix_caching, copy=self._locked(draft.copy_blocks),
                            release=self._locked(draft.release_blocks))
        with self.lock:
            draft.allocate_cache(kv.num_blocks, self.max_batch_size, kv.capacity)
        return Speculator(self.speculative, DraftModel(draft, kv, self.lock, vocab_size=self.tokenizer.vocab_size,
                                                       chunk=self.prefill_chunk),
                          draft_cost=self.runner.draft_token_cost)

    def _locked(self, call: Callable[[Any], None]) -> Callable[[Any], None]:
        def locked(argument: Any) -> None:
            with self.lock:
                call(argument)
        return locked

    @property
    def kv(self) -> KVCacheManager:
        """The KV cache manager (created with the scheduler, on first use)."""
        self.scheduler  # noqa: B018 - creates the cache
        assert self._kv is not None
        return self._kv

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        with self.lock:
            self.runner.copy_blocks(pairs)

    def _release_blocks(self, blocks: list[int]) -> None:
        with self.lock:
            self.runner.release_blocks(blocks)

    def kv_bytes(self) -> int:
        """The KV cache's budgeted size: its capacity in positions times their size."""
        layout = self.runner.kv_layout
        return 0 if layout is None else self.kv_cache_tokens * layout.bytes_per_token

    def draft_bytes(self) -> int:
        """The draft model's weights and buffers, and its KV cache at capacity (0 without one)."""
        draft = self.draft
        if draft is None:
            return 0
        layout = draft.kv_layout
        return draft.memory_bytes() + (0 if layout is None else self.kv_cache_tokens * layout.bytes_per_token)

    def memory_bytes(self) -> int:
        """Weights and runtime buffers, plus the KV cache at its capacity (and the draft model's)."""
        return self.runner.memory_bytes() + self.kv_bytes() + self.draft_bytes()

    def backlog(self) -> dict[str, int]:
        """Right now: requests waiting, running (prefilling or decoding), prefilling,
        and prompt tokens still to compute."""
        scheduler = self._scheduler
        if scheduler is None:
            return dict(IDLE_BACKLOG)
        return {"queued": scheduler.queue_depth, "running": scheduler.running, "prefilling": scheduler.prefilling,
                "prefill_tokens_pending": scheduler.prefill_tokens_pending}

    def stalled_for(self) -> float:
        """Seconds the engine has had work and made no progress (0 if it moves, idles or never ran)."""
        scheduler = self._scheduler
        return 0.0 if scheduler is None else scheduler.stalled_for()

    def fail_stalled(self, seconds: float) -> int:
        """Fail the requests stuck on a stalled engine (``EngineStalledError``); returns how many."""
        scheduler = self._scheduler
        return 0 if scheduler is None else scheduler.fail_stalled(seconds)

    def cache_stats(self) -> dict[str, float]:
        """The KV cache's use and the prefix cache's savings (empty before the first request)."""
        kv = self._kv
        return {} if kv is None else kv.stats().as_dict()

    def speculation_stats(self) -> dict[str, Any]:
        """Speculative decoding's counters: ``spec_method``, ``spec_draft_tokens``,
        ``spec_accepted_tokens``, ``spec_verify_steps``, ``spec_acceptance_rate``,
        ``decode_steps``, ``decode_tokens`` and ``spec_tokens_per_step`` (tokens a
        decoding sequence gains per engine step); empty before the first request."""
        scheduler = self._scheduler
        return {} if scheduler is None else scheduler.speculation_stats()

    def close(self) -> None:
        """Stop the scheduler (requests still running fail), then free the runner (and the draft's)."""
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()
        self.runner.close()
        if self.draft is not None:
            self.draft.close()

    # -- generation -------------------------------------------------------
    def prompt_ids(self, prompt: str | list[int], limit: int | None = None) -> list[int]:
        """Token ids of a prompt, refused when empty or longer than the model's
        context (or ``limit``, a server's cap)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise OptionsError("generation", "the prompt is empty")
        if not isinstance(prompt, str):
            vocab = self.tokenizer.vocab_size
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise OptionsError("prompt", f"token id {bad!r} is not in the vocabulary (0..{vocab - 1})")
        if limit is not None and len(ids) > limit:
            raise PromptTooLongError(len(ids), limit, "this server accepts at most")
        if len(ids) >= self.runner.max_context:
            raise PromptTooLongError(len(ids), self.runner.max_context - 1, "the model's context holds at most")
        return ids

    def submit(self, prompt: list[int], params: SamplingParams, timeout: float | None = None,
               processors: Sequence[LogitsProcessor] = (), loop: asyncio.AbstractEventLoop | None = None,
               adapter: str | None = None) -> Request:
        """Queue one generation (with one of ``adapters``, when named); iterate the
        returned request for its chunks (``async for`` when ``loop`` is given)."""
        return self.scheduler.submit(prompt, params, timeout=timeout, processors=processors, loop=loop,
                                     adapter=self.adapter(adapter))

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], timing: Timing | None = None,
                 timeout: float | None = None, processors: Sequence[LogitsProcessor] = (),
                 adapter: str | None = None) -> list[GenerationResult]:
        """Complete every prompt; each joins the running batch like any other request."""
        requests = []
        try:
            for prompt, p in zip(prompts, params):
                requests.append(self.submit(prompt, p, timeout, processors, adapter=adapter))
            results = [_result(request, list(request)) for request in requests]
        finally:
            for request in requests:  # the caller gave up (an error, an interrupt): stop the rest
                request.cancel()
        if timing is not None:
            timing.queue_wait = max(r.queue_wait for r in requests)
        return results

    async def agenerate(self, prompts: list[list[int]], params: list[SamplingParams], timing: Timing | None = None,
                        timeout: float | None = None, processors: Sequence[LogitsProcessor] = (),
                        adapter: str | None = None) -> list[GenerationResult]:
        """``generate`` for a coroutine: no thread is blocked while it runs."""
        loop = asyncio.get_running_loop()
        requests = []
        try:
            for prompt, p in zip(prompts, params):
                requests.append(self.submit(prompt, p, timeout, processors, loop, adapter))
            results = [_result(request, [chunk async for chunk in request]) for request in requests]
        finally:
            for request in requests:
                request.cancel()
        if timing is not None:
            timing.queue_wait = max(r.queue_wait for r in requests)
        return results

    def stream(self, prompt: list[int], params: SamplingParams, timing: Timing | None = None,
               timeout: float | None = None, processors: Sequence[LogitsProcessor] = (),
               adapter: str | None = None) -> Iterator[StreamChunk]:
        request = self.submit(prompt, params, timeout, processors, adapter=adapter)
        try:
            for chunk in request:
                if timing is not None:
                    timing.queue_wait = request.queue_wait
                yield chunk
        finally:
            request.cancel()  # a no-op once finished; otherwise the reader went away

    async def astream(self, request: Request, timing: Timing | None = None) -> AsyncIterator[StreamChunk]:
        """The chunks of a request submitted with ``loop``; leaving early cancels it."""
        try:
            async for chunk in request:
                if timing is not None:
                    timing.queue_wait = request.queue_wait
                yield chunk
        finally:
            request.cancel()

    # -- scoring ----------------------------------------------------------
    def _scores(self, ids: list[int], adapter: Adapter | None) -> np.ndarray:
        with self.lock:
            return self.runner.logits(ids) if adapter is None else self.runner.logits(ids, adapter=adapter.weights)

    def prompt_logprobs(self, ids: list[int], top: int = 0, adapter: str | None = None) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the ones before it (the
        first has none), with the ``top`` likeliest tokens at each position."""
        from llmk.sampling import TokenLogprob, logprob_of

        if self.runner.task != "generate":
            raise UnsupportedError("this model embeds text; log-probabilities need a model that generates")
        logits = self._scores(ids, self.adapter(adapter))
        text = self.tokenizer.token_text
        first = TokenLogprob(ids[0], text(ids[0]), None)
        return [first] + [logprob_of(logits[i - 1], ids[i], top, text) for i in range(1, len(ids))]

    def perplexity(self, text: str, adapter: str | None = None) -> float:
        """exp(mean negative log-likelihood) of ``text``; long texts are scored in
        overlapping windows (half-window stride), each token counted once."""
        import numpy as np

        if self.runner.task != "generate":
            raise UnsupportedError("this model embeds text; perplexity needs a model that generates")
        served = self.adapter(adapter)
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise OptionsError("perplexity", "the text needs at least two tokens")
        window = min(self.runner.max_context, 1024)
        stride = window // 2
        total, count, scored_to = 0.0, 0, 1  # position 0 has no prediction
        start = 0
        while scored_to < len(ids):
            chunk = ids[start:start + window]
            logits = self._scores(chunk, served).astype(np.float64)
            # logits[t] predicts chunk[t + 1]; score only positions not yet counted.
            first = scored_to - start
            targets = np.array(chunk[first:])
            rows = logits[first - 1:len(chunk) - 1]
            shift = rows.max(axis=-1, keepdims=True)
            logsumexp = np.log(np.exp(rows - shift).sum(axis=-1)) + shift[:, 0]
            total += float((logsumexp - rows[np.arange(len(targets)), targets]).sum())
            count += len(targets)
            scored_to = start + len(chunk)
            start += stride
        return math.exp(total / count)

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalized sentence embeddings (sentence-transformers' recipe)."""
        import numpy as np

        if self.runner.task != "embed":
            raise UnsupportedError("this model generates text; load an embedding model to embed")
        if not texts:
            return []
        input_ids, mask = self.tokenizer.batch(list(texts))
        with self.lock:
            hidden = self.runner.encode(input_ids, mask).astype(np.float64)
        weights = mask[:, :, None].astype(np.float64)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return (pooled / norms).tolist()


class PromptTooLongError(OptionsError):
    """A prompt has more tokens than the model's context or the server's limit."""

    def __init__(self, tokens: int, limit: int, what: str):
        self.tokens, self.limit = tokens, limit
        super().__init__("generation", f"the prompt has {tokens} tokens; {what} {limit}")
