"""Picking tokens from logits: the sampling parameters and the per-row pipeline.

For every sequence that gets logits in an engine step, the engine runs its
logits processors in order (each a small object with ``__call__``, like
transformers' ``LogitsProcessor``), then ``sample``. A sequence's pipeline is
built from its ``SamplingParams``: the penalties (``Penalties``), the
``logit_bias``, the caller's own processors, then the grammar's token mask
(``llmk.constraints``) last, so that nothing re-enables a token the grammar
forbids. A processor sees the tokens the sequence generated so far and returns
the logits to sample from; ``TokenMask`` is the hook constrained decoding plugs
into: it keeps only the tokens a mask function allows.

Log-probabilities (``logprobs``) are the model's own, computed on the raw logits
before any processor, as vLLM reports them by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmk.errors import OptionsError, format_validation_error

if TYPE_CHECKING:
    import numpy as np


#: A temperature below this samples greedily (dividing by it would overflow the logits).
GREEDY_BELOW = 1e-5


class SamplingParams(BaseModel):
    """How to pick tokens. ``temperature=0`` (or below ``GREEDY_BELOW``) is greedy; a
    ``seed`` makes sampling reproducible."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 keeps every token")
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    #: OpenAI's penalties: subtracted once from every token already generated
    #: (presence), and once per occurrence (frequency).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    #: transformers' (CTRL's): logits of tokens in the prompt or the output are
    #: divided by it when positive, multiplied when negative. 1 is off.
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    #: Token id -> a value added to its logit (-100 bans it, 100 all but forces it).
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(default_factory=dict)
    #: Report the log-probability of each generated token, and of the ``top_logprobs`` likeliest.
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    #: Constrained decoding (``llmk.constraints``), at most one: a JSON schema the output
    #: must validate against, a regular expression it must match in full, or a
    #: grammar in Lark or GBNF form.
    json_schema: dict[str, Any] | None = None
    regex: str | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingParams:
        given = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are exclusive: give one constraint")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        return self

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

    @classmethod
    def build(cls, **fields: Any) -> SamplingParams:
        if isinstance(fields.get("stop"), str):
            fields["stop"] = (fields["stop"],)
        try:
            return cls.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as error:
            raise OptionsError("generation", format_validation_error(error)) from None

    def for_row(self, row: int) -> SamplingParams:
        """The parameters of choice ``row`` of ``n``: the same, with its own seed
        stream (derived from ``seed``) so that the choices differ but reproduce."""
        if row == 0 or self.seed is None:
            return self
        return self.model_copy(update={"seed": row_seed(self.seed, row)})


def row_seed(seed: int, row: int) -> int:
    """The seed of choice ``row`` of a request seeded with ``seed`` (row 0 keeps it)."""
    if row == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, row]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Alternative:
    """A token the model could have picked at a step, with its log-probability."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability, and the likeliest tokens at its step (``top``)."""

    token_id: int
    token: str
    #: ``None`` for a prompt's first token, which nothing predicts.
    logprob: float | None
    top: tuple[Alternative, ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    scores = logits.astype(np.float64)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logprob_of(logits: np.ndarray, token: int, top: int, text: Callable[[int], str]) -> TokenLogprob:
    """``token``'s log-probability under the softmax of ``logits``, and the ``top``
    likeliest tokens; ``text`` gives a token's text."""
    import numpy as np

    logprobs = log_softmax(logits)
    best: tuple[Alternative, ...] = ()
    if top:
        ids = np.argpartition(-logprobs, top)[:top] if top < logprobs.shape[-1] else np.arange(logprobs.shape[-1])
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        best = tuple(Alternative(int(i), text(int(i)), float(logprobs[i])) for i in ids)
    return TokenLogprob(token, text(token), float(logprobs[token]), best)


class LogitsProcessor(Protocol):
    """One stage of the sampling pipeline, run on one sequence's logits row."""

    def __call__(self, output_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        """Return the logits to sample the next token from (``logits`` may be changed in place)."""


class Penalties:
    """OpenAI's presence and frequency penalties, and transformers' repetition penalty."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]):
        import numpy as np

        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        self.prompt_seen = np.unique(np.asarray(prompt_ids, dtype=np.int64))  # once, not at every step

    def __call__(self, output_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        import numpy as np

        logits = logits.astype(np.float32, copy=True)
        if self.repetition != 1.0:
            seen = np.union1d(self.prompt_seen, np.asarray(output_ids, dtype=np.int64))
            picked = logits[seen]
            logits[seen] = np.where(picked > 0, picked / self.repetition, picked * self.repetition)
        if output_ids and (self.presence or self.frequency):
            ids, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
            logits[ids] -= self.presence + self.frequency * counts
        return logits


class LogitBias:
    """Adds a fixed value to chosen tokens' logits (OpenAI's ``logit_bias``)."""

    def __init__(self, bias: dict[int, float], vocab_size: int):
        import numpy as np

        bad = [token for token in bias if not 0 <= token < vocab_size]
        if bad:
            raise OptionsError("logit_bias", f"token id {bad[0]} is not in the vocabulary (0..{vocab_size - 1})")
        self.ids = np.fromiter(bias.keys(), dtype=np.int64)
        self.values = np.fromiter(bias.values(), dtype=np.float32)

    def __call__(self, output_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        import numpy as np

        logits = logits.astype(np.float32, copy=True)
        logits[self.ids] += self.values
        return logits


class TokenMask:
    """Keep only the tokens ``allowed(output_ids)`` permits: a boolean array over
    the vocabulary (or ``None`` for no constraint at this step). Every other token's
    logit becomes ``-inf``, so even greedy decoding cannot pick it."""

    def __init__(self, allowed: Callable[[Sequence[int]], np.ndarray | None]):
        self.allowed = allowed

    def __call__(self, output_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        import numpy as np

        mask = self.allowed(output_ids)
        if mask is None:
            return logits
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != logits.shape:
            raise OptionsError("token mask", f"the mask has shape {mask.shape}; the logits have {logits.shape}")
        if not mask.any():
            raise OptionsError("token mask", "the mask allows no token")
        return np.where(mask, logits, -np.inf)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits."""
    import numpy as np

    if params.temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    probs = probabilities(logits, params)
    return int(rng.choice(probs.shape[-1], p=probs))


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution ``sample`` draws from (temperature, top-k, top-p), as float64;
    speculative decoding's rejection sampling (``llmk.speculative``) needs it whole.
    Not for greedy parameters."""
    import numpy as np

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
    return probs
