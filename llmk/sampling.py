"""Picking tokens from logits: the sampling parameters and the per-row pipeline.

For every sequence that gets logits in an engine step, the engine runs its
logits processors in order (each a small object with ``__call__``, like
transformers' ``LogitsProcessor``: penalties, biases, a grammar's token mask),
then ``sample``. A processor sees the tokens the sequence generated so far and
returns the logits to sample from; ``TokenMask`` is the hook constrained
decoding plugs into: it keeps only the tokens a mask function allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmk.errors import OptionsError, format_validation_error

if TYPE_CHECKING:
    import numpy as np


class SamplingParams(BaseModel):
    """How to pick tokens. ``temperature=0`` is greedy; a ``seed`` makes sampling reproducible."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 keeps every token")
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: tuple[Annotated[str, Field(min_length=1)], ...] = ()

    @classmethod
    def build(cls, **fields: Any) -> SamplingParams:
        if isinstance(fields.get("stop"), str):
            fields["stop"] = (fields["stop"],)
        try:
            return cls.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as error:
            raise OptionsError("generation", format_validation_error(error)) from None


class LogitsProcessor(Protocol):
    """One stage of the sampling pipeline, run on one sequence's logits row."""

    def __call__(self, output_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        """Return the logits to sample the next token from (``logits`` may be changed in place)."""


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
