"""The engine loop: one thread per loaded model runs every generation, in steps.

A step is a token budget (vLLM v1's scheduler, llama.cpp's server slots): every
running sequence whose prompt is in the KV cache decodes one token, and up to
``prefill_chunk`` prompt tokens go to the sequences still prefilling, oldest
first. A long prompt is computed over several steps while the others keep
streaming, and a cancelled or expired request stops within one step. While
other sequences decode, the budget counts what a prompt token costs: a token at
position ``p`` also attends to the ``p`` before it, so it counts
``1 + p / ATTENTION_SPAN`` — the chunks of a long prompt shrink as it grows, and
every step they wait on takes about as long as the first. Between
steps the scheduler drops cancelled and expired requests, frees what finished,
and admits waiting requests, first come first served, while there is a free
slot (``max_batch_size``) and KV room for the prompt plus ``max_tokens``.

Runners keep no state per sequence (``llmk.backend.SequenceStep``): a request
joining the batch costs its own prompt and nothing else, and one leaving costs
nothing. A failure in a step fails the requests in that step, with the error,
and no others.

Speculative decoding (``llmk.speculative``) rides in the same steps: a decoding
sequence may send its last token plus drafts and get logits for each, and
``_advance`` keeps the drafts the model agrees with. Rows with and without
drafts, and prompt chunks, share a step; drafts are not counted in the prefill
budget (there are at most ``max_batch * num_draft`` of them).

Chunks reach their readers through each request's channel: a queue for a
thread, or an asyncio queue fed with ``loop.call_soon_threadsafe`` for a
coroutine (vLLM's ``RequestOutputCollector``), never a thread per request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llmk.backend import SequenceStep
from llmk.errors import LlmkError, OptionsError
from llmk.logs import get_logger
from llmk.sampling import logprob_of, sample
from llmk.sequence import Sequence as GenSequence
from llmk.sequence import StreamChunk
from llmk.speculative import SpeculativeConfig, Speculator, verify

if TYPE_CHECKING:
    import numpy as np

    from llmk.backend import Runner
    from llmk.kv import KVCacheManager
    from llmk.sampling import LogitsProcessor, SamplingParams
    from llmk.sequence import Adapter
    from llmk.tokenizer import Tokenizer

log = get_logger("llmk.scheduler")

_END = object()

#: The position at which a prompt token's attention costs about as much as the rest of
#: its layer (measured on SmolLM2: ~3,000 positions on onnxruntime, ~3,900 on openvino;
#: lower is safer for the streams waiting on the step).
ATTENTION_SPAN = 2048


class QueueFullError(LlmkError):
    """A model's request queue is full; the caller should retry later."""

    def __init__(self, model: str, depth: int, limit: int | None = None, *, why: str | None = None):
        self.model, self.depth = model, depth
        why = why or f"{depth} requests waiting, its queue limit ({limit} beyond a full batch)"
        super().__init__(f"model {model!r} has {why}; retry later")


class EngineClosedError(LlmkError):
    """The model was unloaded (or its engine stopped) while a request was queued or running."""


class EngineStalledError(LlmkError):
    """The model's engine made no progress for too long while this request waited on it."""


class _ThreadChannel:
    """Chunks for a reader in a thread."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, item: Any) -> bool:
        self._items.put(item)
        return True

    def get(self) -> Any:
        return self._items.get()


class _LoopChannel:
    """Chunks for a coroutine: handed to its event loop, which wakes the reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody will read this
            return False
        return True

    async def get(self) -> Any:
        return await self._items.get()


class Request:
    """One submitted generation: iterate it (``for`` in a thread, ``async for`` on the
    event loop it was submitted from) for its chunks; ``cancel`` stops it."""

    def __init__(self, sequence: GenSequence, deadline: float | None, loop: asyncio.AbstractEventLoop | None):
        self.sequence = sequence
        self.deadline = deadline
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None
        self.cancelled = threading.Event()
        self.cancel_reason = "cancelled"
        self._channel: _ThreadChannel | _LoopChannel = _LoopChannel(loop) if loop else _ThreadChannel()

    @property
    def queue_wait(self) -> float:
        """Seconds from submission until the scheduler admitted it (so far, if still waiting)."""
        return (self.admitted or self.finished or time.perf_counter()) - self.submitted

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.submitted

    @property
    def first_token_seconds(self) -> float:
        return (self.first_token or self.finished or time.perf_counter()) - self.submitted

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating (a no-op once finished); the reader gets a last chunk
        whose ``finish_reason`` is ``cancelled`` (or ``timeout``)."""
        if self.finished is None:
            self.cancel_reason = reason
            self.cancelled.set()

    def __iter__(self) -> Iterator[StreamChunk]:
        channel = self._channel
        if not isinstance(channel, _ThreadChannel):
            raise TypeError("this request was submitted from an event loop: use `async for`")
        while True:
            item = channel.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        channel = self._channel
        if not isinstance(channel, _LoopChannel):
            raise TypeError("this request was submitted from a thread: use `for`")
        while True:
            item = await channel.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # -- the scheduler's side ---------------------------------------------------------
    def _emit(self, chunk: StreamChunk) -> None:
        now = time.perf_counter()
        if self.first_token is None and chunk.token_ids:
            self.first_token = now
        if chunk.finish_reason is not None:
            self.finished = now
        delivered = self._channel.put(chunk)
        if chunk.finish_reason is not None:
            self._channel.put(_END)
        elif not delivered:
            self.cancel()

    def _fail(self, error: BaseException) -> None:
        self.finished = self.finished or time.perf_counter()
        self._channel.put(error)


class Scheduler:
    """Runs the generations of one model on a background thread, in steps.

    ``runner_lock`` is held around every runner call (scoring calls take it
    between steps). The gauges (``queue_depth``, ``running``, ``prefilling``,
    ``prefill_tokens_pending``) and ``speculation_stats()`` may be read from any
    thread. ``speculator`` drafts tokens ahead (default: none).
    """

    def __init__(self, runner: Runner, tokenizer: Tokenizer, kv: KVCacheManager, *, runner_lock: threading.Lock,
                 name: str = "model", max_batch_size: int = 8, max_queue: int = 1024, prefill_chunk: int = 256,
                 max_queued_prompt_tokens: int | None = None, speculator: Speculator | None = None):
        self.runner, self.tokenizer, self.kv, self.runner_lock = runner, tokenizer, kv, runner_lock
        self.speculator = speculator or Speculator(SpeculativeConfig(method="off"))
        self.name = name
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.max_queued_prompt_tokens = max_queued_prompt_tokens
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in admission order
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.prefilling = 0
        self.prefill_tokens_pending = 0
        self.steps = 0  # engine steps run, for tests and metrics
        #: ``time.monotonic()`` of the engine's last sign of life (a step done, idle, or work
        #: arriving at an idle engine).
        self.progress_at = time.monotonic()
        #: (decode rows, prompt tokens) of the most recent steps, last one last.
        self.recent_steps: deque[tuple[int, int]] = deque(maxlen=1024)

    # -- callers ------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, timeout: float | None = None,
               processors: Sequence[LogitsProcessor] = (), loop: asyncio.AbstractEventLoop | None = None,
               adapter: Adapter | None = None) -> Request:
        """Queue one generation (with ``adapter``'s weights, when given). With ``loop``
        (the running event loop) the request is read with ``async for``, else with ``for``. Raises ``QueueFullError``
        when the batch and the queue are full, and ``OptionsError`` when the prompt
        and ``max_tokens`` could never fit in the KV cache."""
        sequence = GenSequence(prompt_ids, params, self.tokenizer, self.runner.max_context, processors, adapter)
        if not self.kv.fits_ever(sequence.max_length):
            capacity = self.kv.capacity * self.kv.block_size
            raise OptionsError("generation", f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                               f"({sequence.budget}) needs {sequence.max_length} tokens of KV cache; model "
                               f"{self.name!r} has room for {capacity} (raise its kv_cache, or lower max_tokens)")
        request = Request(sequence, None if timeout is None else time.perf_counter() + timeout, loop)
        with self._wake:
            if self._closed:
                raise EngineClosedError(f"model {self.name!r} is shutting down")
            free_slots = max(0, self.max_batch_size - len(self._running))
            if len(self._waiting) >= self.max_queue + free_slots:  # the batch is full and so is the queue
                raise QueueFullError(self.name, len(self._waiting), self.max_queue)
            # (an estimate: the engine thread may be computing some of the running prompts now)
            pending = (sum(r.sequence.pending_prompt for r in list(self._running))
                       + sum(len(r.sequence.prompt_ids) for r in self._waiting))
            budget = self.max_queued_prompt_tokens
            if budget is not None and pending and pending + len(prompt_ids) > budget:
                raise QueueFullError(self.name, len(self._waiting), why=(
                    f"{pending} prompt tokens waiting to be computed; this one's {len(prompt_ids)} would pass "
                    f"its budget of {budget} (max_queued_prompt_tokens)"))
            if not self._waiting and not self._running:
                # Idle until now: the stall clock starts with this work, not when the engine
                # last went idle (else a watchdog pass before the thread wakes fails it).
                self.progress_at = time.monotonic()
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"llmk-engine-{self.name}", daemon=True)
                self._thread.start()
            self._wake.notify()
        return request

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests admitted: prefilling or decoding."""
        return len(self._running)

    def speculation_stats(self) -> dict[str, Any]:
        """Drafted and accepted tokens, verification steps, acceptance rate and tokens
        per decoding step, since the model loaded (``llmk.speculative.SpeculationStats``)."""
        return self.speculator.stats.as_dict()

    def stalled_for(self) -> float:
        """Seconds the engine has had work and made no progress (0 when it moves or idles)."""
        with self._wake:
            busy = bool(self._waiting or self._running)
        return max(0.0, time.monotonic() - self.progress_at) if busy else 0.0

    def fail_stalled(self, seconds: float) -> int:
        """Fail every request waiting on a stalled engine with ``EngineStalledError``
        (the watchdog calls it from its own thread); returns how many. Running ones
        are also cancelled, so that the engine drops them if it ever moves again."""
        error = EngineStalledError(f"model {self.name!r} made no progress for {seconds:.0f} s; its request was "
                                   "failed by the watchdog")
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
            running = list(self._running)
        for request in waiting + running:
            if request.finished is None:
                request.cancel()
                request._fail(error)
        return len(waiting) + len(running)

    def close(self) -> None:
        """Stop the thread; requests still queued or running fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        failure: BaseException = EngineClosedError(f"model {self.name!r} was unloaded")
        try:
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self._running:
                        self.progress_at = time.monotonic()
                        self._wake.wait()
                    if self._closed:
                        break
                self._admit()
                self._step()
                self.progress_at = time.monotonic()
        except BaseException as error:  # a bug: nobody may be left waiting for this thread
            log.error("engine.crashed", model=self.name, error=repr(error))
            failure = error
            with self._wake:
                self._closed = True
        with self._wake:
            orphans = [*self._waiting, *self._running]
            self._waiting.clear()
        for request in orphans:
            request._fail(failure)
        self._running = []

    def _admit(self) -> None:
        """Move waiting requests into the batch while there is a slot and KV room.
        The queue's lock is not held while the KV cache admits: reusing a prefix may
        copy blocks, a runner call, and a submitter must never wait on the runner."""
        while len(self._running) < self.max_batch_size:
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting[0]
                if self._expired(request):
                    self._waiting.popleft()
                    continue
            sequence = request.sequence
            allocation = self.kv.admit(sequence.prompt_ids, sequence.max_length,
                                       root=b"" if sequence.adapter is None else sequence.adapter.root)
            if allocation is None:
                return  # first come, first served: it waits for room, and so does everyone behind it
            with self._wake:
                # Only this thread takes from the head; the watchdog may have emptied the queue meanwhile.
                still_waiting = bool(self._waiting) and self._waiting[0] is request
                if still_waiting:
                    self._waiting.popleft()
                    sequence.kv, sequence.computed = allocation, allocation.reused_tokens
                    request.admitted = time.perf_counter()
                    self._running.append(request)
            if not still_waiting:
                self.kv.free(allocation)
                continue
            self.speculator.start(sequence)

    def _step(self) -> None:
        for request in [r for r in self._running if self._expired(r)]:
            self._finish(request)
        steps, owners = self._plan()
        if steps:
            try:
                with self.runner_lock:
                    logits = self.runner.forward(steps)
            except Exception as error:
                log.error("engine.step_failed", model=self.name, error=repr(error), sequences=len(steps))
                self._isolate(steps, owners, error)
            else:
                self.steps += 1
                self._advance(steps, owners, logits)
        self.prefilling = sum(1 for r in self._running if r.sequence.prefilling)
        self.prefill_tokens_pending = sum(r.sequence.pending_prompt for r in self._running)

    def _isolate(self, steps: list[SequenceStep], owners: list[Request], error: Exception) -> None:
        """A step failed: run its sequences one by one, so that the error fails the
        requests it concerns and no others (a step only rewrites its own positions,
        so running it again is safe)."""
        if len(steps) == 1:
            self._finish(owners[0], error)
            return
        for step, request in zip(steps, owners):
            try:
                with self.runner_lock:
                    logits = self.runner.forward([step])
            except Exception as own_error:
                self._finish(request, own_error)
            else:
                self._advance([step], [request], logits)

    def _plan(self) -> tuple[list[SequenceStep], list[Request]]:
        """This step's work: a token (and its drafts) for each decoding sequence, then
        prompt chunks within the budget (``ATTENTION_SPAN``), oldest first."""
        steps: list[SequenceStep] = []
        owners: list[Request] = []
        budget = self.prefill_chunk
        decoders = [r for r in self._running if not r.sequence.prefilling]
        try:
            drafts = self.speculator.propose([r.sequence for r in decoders])
        except Exception as error:  # the draft model failed: like a failed step, its requests fail
            log.error("engine.draft_failed", model=self.name, error=repr(error), sequences=len(decoders))
            for request in decoders:
                self._finish(request, error)
            decoders, drafts = [], []
        for request, draft in zip(decoders, drafts):
            sequence = request.sequence
            length = len(sequence.token_ids)
            self.kv.ensure(sequence.kv, length + len(draft))
            steps.append(SequenceStep(sequence.kv.slot, [sequence.token_ids[-1], *draft], length - 1,
                                      sequence.kv.blocks, logits=1 + len(draft), adapter=_weights(sequence)))
            owners.append(request)
        decoding = len(steps)
        for request in self._running:
            sequence = request.sequence
            if not sequence.prefilling or budget <= 0:
                continue
            # Attention is counted only when streams wait on the step.
            weight = 1.0 + sequence.computed / ATTENTION_SPAN if decoding else 1.0
            end = sequence.computed + min(sequence.pending_prompt, max(1, int(budget / weight)))
            budget -= (end - sequence.computed) * weight
            self.kv.ensure(sequence.kv, end)
            last = end == len(sequence.prompt_ids)
            steps.append(SequenceStep(sequence.kv.slot, sequence.prompt_ids[sequence.computed:end],
                                      sequence.computed, sequence.kv.blocks, logits=1 if last else 0,
                                      adapter=_weights(sequence)))
            owners.append(request)
        if steps:
            self.recent_steps.append((decoding, sum(len(s.tokens) for s in steps[decoding:])))
        return steps, owners

    def _advance(self, steps: list[SequenceStep], owners: list[Request], logits: np.ndarray) -> None:
        """Take in a step's results: sample (and verify drafts) where there are
        logits, stream, finish."""
        row = 0
        for step, request in zip(steps, owners):
            sequence = request.sequence
            if not step.logits:
                sequence.computed = step.start + len(step.tokens)
                self.kv.commit(sequence.kv, sequence.token_ids, sequence.computed)
                continue
            rows = logits[row:row + step.logits]
            row += step.logits
            # Drafts are the tokens after the first position with logits: each row checks the next one.
            drafts = step.tokens[len(step.tokens) - step.logits + 1:]
            decoding = not sequence.prefilling
            try:
                chunks, accepted = self._verify(sequence, rows, drafts)
            except Exception as error:  # a processor's failure is its request's alone
                self._finish(request, error)
                continue
            # Positions of rejected drafts are not computed: a later step overwrites them.
            sequence.computed = step.start + len(step.tokens) - len(drafts) + accepted
            if decoding:
                self.speculator.verified(sequence, len(drafts), accepted, len(chunks))
            self.kv.commit(sequence.kv, sequence.token_ids, sequence.computed)
            request._emit(StreamChunk.join(chunks))
            if sequence.finish is not None:
                self._finish(request)
            elif request.cancelled.is_set():  # its reader went away
                self._expired(request)
                self._finish(request)

    def _verify(self, sequence: GenSequence, rows: np.ndarray, drafts: list[int]) -> tuple[list[StreamChunk], int]:
        """Push the tokens of one sequence's logits ``rows``: at each drafted position
        the token ``verify`` picks, then, after the last draft, a sampled one; stop at
        the first draft not kept or the first finish. Returns the chunks pushed and how
        many drafts were kept. The processors see the output as it grows, one position
        at a time, exactly as without drafts."""
        params = sequence.params
        q = self.speculator.draft_probabilities(sequence) if drafts else None
        chunks: list[StreamChunk] = []
        accepted = 0
        for position, raw in enumerate(rows):
            scores = raw
            for processor in sequence.processors:
                scores = processor(sequence.output_ids, scores)
            if position < len(drafts):
                token, kept = verify(scores, drafts[position], params, sequence.rng,
                                     None if q is None else q[position])
            else:
                token, kept = sample(scores, params, sequence.rng), False
            accepted += kept
            chunks.append(sequence.push(token, (logprob_of(raw, token, params.top_logprobs, self.tokenizer.token_text)
                                                if params.logprobs else None)))
            if not kept or sequence.finish is not None:
                break
        return chunks, accepted

    def _finish(self, request: Request, error: BaseException | None = None) -> None:
        """Take a request out of the batch and give its cache (and its draft's) back."""
        if error is not None:
            request._fail(error)
        if request in self._running:
            self._running.remove(request)
        sequence = request.sequence
        if sequence.kv is not None:
            self.speculator.end(sequence)
            self.kv.free(sequence.kv)
            sequence.kv = None

    def _expired(self, request: Request) -> bool:
        """Cancelled or past its deadline: tell its reader, and let it go."""
        if request.sequence.finish is not None:
            return False
        if request.deadline is not None and time.perf_counter() > request.deadline:
            request.cancel("timeout")
        if not request.cancelled.is_set():
            return False
        reason = "timeout" if request.cancel_reason == "timeout" else "cancelled"
        request._emit(request.sequence.stop(reason))
        return True


def _weights(sequence: GenSequence) -> object:
    """What the runner applies to the sequence's rows: its adapter's weights, or nothing."""
    return None if sequence.adapter is None else sequence.adapter.weights
