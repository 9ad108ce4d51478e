"""Generation, scoring and embedding on top of any ``Runner``.

Backends only produce logits; everything a user can observe about the output —
sampling, seeds, stop sequences, streaming, finish reasons, perplexity, pooling —
happens here, once, so all backends behave identically.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmk.errors import OptionsError, UnsupportedError, format_validation_error
from llmk.tokenizer import Detokenizer, Tokenizer

if TYPE_CHECKING:
    import numpy as np

    from llmk.backend import Runner
    from llmk.scheduler import Request, Scheduler

#: stop: end of sequence or a stop string; length: max_tokens or the context; cancelled:
#: the caller stopped it; timeout: its deadline passed.
FinishReason = Literal["stop", "length", "cancelled", "timeout"]


class SamplingParams(BaseModel):
    """How to pick tokens. ``temperature=0`` is greedy; a ``seed`` makes sampling reproducible."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 keeps every token")
    seed: int | None = None
    stop: tuple[Annotated[str, Field(min_length=1)], ...] = ()

    @classmethod
    def build(cls, **fields: Any) -> SamplingParams:
        if isinstance(fields.get("stop"), str):
            fields["stop"] = (fields["stop"],)
        try:
            return cls.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as error:
            raise OptionsError("generation", format_validation_error(error)) from None


@dataclass
class GenerationResult:
    """One finished completion."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    seconds: float = 0.0
    first_token_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def __str__(self) -> str:
        return self.text


@dataclass
class StreamChunk:
    """A piece of a streamed completion; the last one carries ``finish_reason``."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    def __str__(self) -> str:
        return self.text


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits."""
    import numpy as np

    if params.temperature == 0.0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores[scores < kth] = -np.inf
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.shape[-1], p=probs))


@dataclass
class Timing:
    """What ``Engine.run`` measured for one request."""

    queue_wait: float = 0.0  # seconds in the queue before the scheduler admitted it (its prefill)


class _Sequence:
    """One prompt being completed: its tokens, text and stop state."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, max_context: int):
        import numpy as np

        self.prompt_ids = prompt_ids
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, stop sequences not yet cut
        self.emitted = 0  # how much of ``text`` was handed out
        self.finish: FinishReason | None = None
        self.budget = min(params.max_tokens, max_context - len(prompt_ids))
        self._detok = Detokenizer(tokenizer, prompt_ids)
        self._eos = tokenizer.eos_ids
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    def push(self, token: int) -> StreamChunk:
        self.ids.append(token)
        if token in self._eos:
            self.finish = "stop"
        else:
            self.text += self._detok.push(token)
            # Emitted text never holds a whole stop sequence, so search only what is new.
            cuts = [c for c in (self.text.find(s, self.emitted) for s in self.params.stop) if c != -1]
            if cuts:
                self.text, self.finish = self.text[:min(cuts)], "stop"
        if self.finish is None and len(self.ids) >= self.budget:
            self.finish = "length"
        # Hold back a tail that may still become a stop sequence.
        end = len(self.text) if self.finish or not self.params.stop else max(self.emitted, len(self.text) - self._hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return StreamChunk(piece, [token], self.finish)


class Engine:
    """A runner plus its tokenizer: what one loaded model version can do.

    Generations go through the engine's ``Scheduler`` (continuous batching, up
    to ``max_batch_size`` sequences per decode step); scoring and embedding
    calls take the runner lock between the scheduler's steps.
    """

    def __init__(self, runner: Runner, tokenizer: Tokenizer, *, name: str = "model", max_batch_size: int = 8,
                 max_queue: int = 1024):
        self.runner = runner
        self.tokenizer = tokenizer
        self.lock = threading.Lock()  # held for each runner call
        self.name, self.max_batch_size, self.max_queue = name, max_batch_size, max_queue
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()

    @property
    def scheduler(self) -> Scheduler:
        from llmk.scheduler import Scheduler

        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self, name=self.name, max_batch_size=self.max_batch_size,
                                            max_queue=self.max_queue)
            return self._scheduler

    def backlog(self) -> tuple[int, int]:
        """Generations (waiting in the queue, decoding in the batch) right now."""
        scheduler = self._scheduler
        return (0, 0) if scheduler is None else (scheduler.queue_depth, scheduler.in_flight)

    def close(self) -> None:
        """Stop the scheduler (requests still running fail), then free the runner."""
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()
        self.runner.close()

    # -- generation -------------------------------------------------------
    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise OptionsError("generation", "the prompt is empty")
        if len(ids) >= self.runner.max_context:
            raise OptionsError(
                "generation", f"the prompt has {len(ids)} tokens; the model's context is {self.runner.max_context}"
            )
        return ids

    def submit(self, prompt: list[int], params: SamplingParams, timeout: float | None = None) -> Request:
        """Queue one generation; iterate the returned request for its chunks."""
        if self.runner.task != "generate":
            raise UnsupportedError("this model embeds text; it does not generate")
        return self.scheduler.submit(prompt, params, timeout=timeout)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 timing: Timing | None = None, timeout: float | None = None) -> list[GenerationResult]:
        """Complete every prompt; each joins the running batch like any other request."""
        requests = [self.submit(p, q, timeout) for p, q in zip(prompts, params)]
        results = []
        try:
            for prompt, request in zip(prompts, requests):
                texts, ids, reason = [], [], None
                for chunk in request:
                    texts.append(chunk.text)
                    ids += chunk.token_ids
                    reason = chunk.finish_reason or reason
                results.append(GenerationResult("".join(texts), ids, reason, len(prompt), request.seconds,
                                                request.first_token_seconds))
        finally:
            for request in requests:  # the caller gave up (an error, an interrupt): stop the rest
                request.cancel()
        if timing is not None:
            timing.queue_wait = max(r.queue_wait for r in requests)
        return results

    def stream(self, prompt: list[int], params: SamplingParams, timing: Timing | None = None,
               timeout: float | None = None) -> Iterator[StreamChunk]:
        request = self.submit(prompt, params, timeout)
        try:
            for chunk in request:
                if timing is not None:
                    timing.queue_wait = request.queue_wait
                yield chunk
        finally:
            request.cancel()  # a no-op once finished; otherwise the reader went away

    # -- scoring ----------------------------------------------------------
    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of ``text``; long texts are scored in
        overlapping windows (half-window stride), each token counted once."""
        import numpy as np

        if self.runner.task != "generate":
            raise UnsupportedError("this model embeds text; perplexity needs a model that generates")
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise OptionsError("perplexity", "the text needs at least two tokens")
        window = min(self.runner.max_context, 1024)
        stride = window // 2
        total, count, scored_to = 0.0, 0, 1  # position 0 has no prediction
        start = 0
        while scored_to < len(ids):
            chunk = ids[start:start + window]
            with self.lock:
                logits = self.runner.logits(chunk).astype(np.float64)
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
