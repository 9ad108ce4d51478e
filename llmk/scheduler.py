"""Continuous batching: one thread per loaded model runs every generation.

Requests wait in a bounded queue. Between two decode steps the scheduler
admits waiting requests (up to ``max_batch_size`` in flight), prefills them
together and merges them into the batch that is already decoding
(``Runner.merge``), so a new request never waits for the others to finish and
every decode step serves everyone in flight. A runner without ``merge`` keeps
each admitted group as its own batch and steps the groups in turn.

A request that is cancelled (its client went away, its deadline passed) leaves
the batch at the next step; its row is dropped with ``DecodeState.select``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmk.errors import LlmkError, UnsupportedError
from llmk.logs import get_logger

if TYPE_CHECKING:
    from llmk.backend import DecodeState
    from llmk.generation import Engine, SamplingParams, StreamChunk, _Sequence

log = get_logger("llmk.scheduler")

_END = object()


class QueueFullError(LlmkError):
    """A model's request queue is full; the caller should retry later."""

    def __init__(self, model: str, depth: int):
        self.model, self.depth = model, depth
        super().__init__(f"model {model!r} has {depth} requests waiting, its queue limit; retry later")


class Request:
    """One submitted generation: iterate it for its chunks, ``cancel`` to stop it."""

    def __init__(self, seq: _Sequence, deadline: float | None):
        self.seq = seq
        self.deadline = deadline
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None
        self.cancelled = threading.Event()
        self.cancel_reason = "cancelled"
        self._chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()

    @property
    def queue_wait(self) -> float:
        return (self.admitted or time.perf_counter()) - self.submitted

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.submitted

    @property
    def first_token_seconds(self) -> float:
        return (self.first_token or self.finished or time.perf_counter()) - self.submitted

    def cancel(self, reason: str = "cancelled") -> None:
        if self.finished is None:
            self.cancel_reason = reason
            self.cancelled.set()

    def __iter__(self) -> Iterator[StreamChunk]:
        while True:
            item = self._chunks.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # -- the scheduler's side ---------------------------------------------------
    def _emit(self, chunk: StreamChunk) -> None:
        now = time.perf_counter()
        if self.first_token is None and chunk.token_ids:
            self.first_token = now
        if chunk.finish_reason is not None:
            self.finished = now
        self._chunks.put(chunk)
        if chunk.finish_reason is not None:
            self._chunks.put(_END)

    def _fail(self, error: BaseException) -> None:
        self._chunks.put(error)


@dataclass
class _Group:
    """Requests decoding together on one ``DecodeState``, in its row order."""

    state: DecodeState
    requests: list[Request] = field(default_factory=list)


class Scheduler:
    """Runs the generations of one engine on a background thread."""

    def __init__(self, engine: Engine, *, name: str = "model", max_batch_size: int = 8, max_queue: int = 1024):
        self.engine, self.name = engine, name
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._waiting: deque[Request] = deque()
        self._groups: list[_Group] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for tests and metrics
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # rows per decode step, most recent last

    # -- callers ------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, timeout: float | None = None) -> Request:
        from llmk.generation import _Sequence

        seq = _Sequence(prompt_ids, params, self.engine.tokenizer, self.engine.runner.max_context)
        request = Request(seq, None if timeout is None else time.perf_counter() + timeout)
        with self._wake:
            if self._closed:
                raise LlmkError(f"model {self.name!r} is shutting down")
            free_slots = max(0, self.max_batch_size - self.in_flight)
            if len(self._waiting) >= self.max_queue + free_slots:  # the batch is full and so is the queue
                raise QueueFullError(self.name, len(self._waiting))
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"llmk-scheduler-{self.name}", daemon=True)
                self._thread.start()
            self._wake.notify()
        return request

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return sum(len(g.requests) for g in self._groups)

    def close(self) -> None:
        """Stop the thread; requests still queued or running fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    # -- the thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._groups:
                    self._wake.wait()
                if self._closed:
                    break
                room = self.max_batch_size - self.in_flight
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                if admitted:
                    self._admit(admitted)
                for group in list(self._groups):
                    self._step(group)
            except Exception as error:  # a bug here must not leave requests hanging forever
                log.error("scheduler.failed", model=self.name, error=repr(error))
                for group in self._groups:
                    for request in group.requests:
                        request._fail(error)
                self._groups = []
        error = LlmkError(f"model {self.name!r} was unloaded")
        for request in [*self._waiting, *(r for g in self._groups for r in g.requests)]:
            request._fail(error)

    def _admit(self, requests: list[Request]) -> None:
        from llmk.generation import sample

        live = [r for r in requests if not self._expired(r)]
        if not live:
            return
        now = time.perf_counter()
        for request in live:
            request.admitted = now
        try:
            with self.engine.lock:
                state, logits = self.engine.runner.prefill([r.seq.prompt_ids for r in live])
        except Exception as error:
            for request in live:
                request._fail(error)
            return
        for row, request in enumerate(live):
            request._emit(request.seq.push(sample(logits[row], request.seq.params, request.seq.rng)))
        group = _Group(state, live)
        self._drop_finished(group)
        if not group.requests:
            return
        if self._groups:
            try:
                with self.engine.lock:
                    merged = self.engine.runner.merge([self._groups[0].state, group.state])
                self._groups[0] = _Group(merged, self._groups[0].requests + group.requests)
                return
            except UnsupportedError:
                pass
        self._groups.append(group)

    def _step(self, group: _Group) -> None:
        from llmk.generation import sample

        self._drop_finished(group)
        if not group.requests:
            self._groups.remove(group)
            return
        tokens = [r.seq.ids[-1] for r in group.requests]
        try:
            with self.engine.lock:
                logits = self.engine.runner.decode(group.state, tokens)
        except Exception as error:
            for request in group.requests:
                request._fail(error)
            self._groups.remove(group)
            return
        self.steps += 1
        self.batch_sizes.append(len(tokens))
        for row, request in enumerate(group.requests):
            request._emit(request.seq.push(sample(logits[row], request.seq.params, request.seq.rng)))

    def _drop_finished(self, group: _Group) -> None:
        keep = [row for row, r in enumerate(group.requests) if r.seq.finish is None and not self._expired(r)]
        if len(keep) == len(group.requests):
            return
        group.requests = [group.requests[row] for row in keep]
        if keep:
            group.state.select(keep)

    def _expired(self, request: Request) -> bool:
        """Cancelled or past its deadline: tell its reader, and let it go."""
        if request.deadline is not None and time.perf_counter() > request.deadline:
            request.cancel("timeout")
        if not request.cancelled.is_set() or request.seq.finish is not None:
            return False
        from llmk.generation import StreamChunk

        request.seq.finish = "timeout" if request.cancel_reason == "timeout" else "cancelled"
        request._emit(StreamChunk("", [], request.seq.finish))
        return True
