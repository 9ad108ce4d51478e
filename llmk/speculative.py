"""Speculative decoding: guess a few tokens ahead, check them all in one step.

A decoding sequence normally gains one token per engine step. Here it sends its
last token plus ``k`` *drafts* (``SequenceStep(tokens=[last, d1..dk],
logits=k + 1)``) and the engine verifies them in order (``verify``): each draft
the target model would have produced is kept, the first one it would not is
replaced by the target's own token, and after ``k`` kept drafts a bonus token
follows from the last logits row. A step therefore emits between 1 and ``k + 1``
tokens for about the price of one when the runtime is memory-bound (batch 1 on a
CPU), and nothing about the output changes:

- **Greedy** output is token-identical to decoding without speculation: a draft is
  kept only when it is the target's argmax, and the token emitted at a mismatch is
  that argmax.
- **Sampled** output keeps the target distribution exactly (rejection sampling,
  Leviathan et al. 2023 / Chen et al. 2023): a draft ``d`` proposed with
  probability ``q(d)`` is kept with probability ``min(1, p(d) / q(d))``, else a token
  is drawn from ``norm(max(0, p - q))``. An n-gram draft is a point mass (``q(d) =
  1``): it is kept with probability ``p(d)``, else a token is drawn from ``p`` with
  ``d`` removed. ``p`` is the distribution the sequence would sample from (its
  logits processors, temperature, top-k, top-p).
- The logits processors (penalties, ``logit_bias``, the caller's, the grammar's mask)
  run position by position, each seeing the output extended by the tokens kept so
  far, exactly as they would one step at a time. A grammar-constrained sequence
  drafts too: its mask only ever consumes kept tokens (a draft is fed to it as
  output only once it is kept), so a rejected draft needs no rollback, and a draft
  the grammar forbids has ``p(d) = 0`` and is never kept.
- Log-probabilities are those of the raw logits at each position, as without
  speculation; tokens are pushed one by one through ``Sequence.push``, so a stop
  string, ``</s>`` or ``max_tokens`` inside the kept drafts ends the sequence there.

The KV cache: drafts are written at the positions after the last token (the
engine ``ensure``s blocks for them within the sequence's reservation), but only
kept positions count as ``computed`` and only final tokens are ever hashed into
the prefix cache (``KVCacheManager.commit``); a rejected draft's position is
simply overwritten by a later step (the step contract, ``llmk.backend``).

Drafts come from a *proposer*:

- ``NgramProposer`` (prompt lookup, vLLM's ``ngram`` method, llama.cpp's lookup
  decoding): find the most recent earlier occurrence of the sequence's last ``n``
  tokens (``n`` from ``ngram_max`` down to ``ngram_min``) in its prompt and output,
  and propose the tokens that followed. Free, and very effective when the answer
  copies its input (rewriting, summarising, extracting, editing code).
- ``DraftModel``: a smaller model with the same vocabulary (``draft:`` on a model
  spec), with its own KV cache (a second ``KVCacheManager`` on the draft runner's
  cache, in the same slots). Each step it catches up on the tokens it has not
  seen, then drafts ``k`` tokens one forward at a time, greedily for greedy
  sequences and sampled (its distribution is the ``q`` above) for sampled ones.

It pays only where a step of ``k + 1`` tokens costs little more than a step of
one: drafting stops while more than ``max_batch`` sequences decode (large
batches are compute-bound; vLLM turns speculation off above a batch size too),
a sequence's draft length grows while its drafts are kept and shrinks when they
are not, and a sequence whose drafts are mostly rejected pauses drafting, for
longer each time it fails again (``SequenceSpeculation``). What a draft token
adds to a step is the runner's ``draft_token_cost`` (a quarter of a step on
onnxruntime int4, nearly half of one on llama.cpp's CPU kernels), and a sequence drafts
only as many tokens as its acceptance makes worth that cost (``best_length``).
It is a fixed figure, not a timing: what is drafted decides how a seeded sampled
answer draws its random numbers, so it must not depend on the machine's load.
``SpeculationStats`` counts drafted and accepted tokens, verification steps, and
tokens per decoding step.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmk.backend import Runner, SequenceStep
from llmk.errors import OptionsError
from llmk.logs import get_logger

if TYPE_CHECKING:
    import numpy as np

    from llmk.backend import Runner
    from llmk.kv import KVAllocation, KVCacheManager
    from llmk.sampling import SamplingParams
    from llmk.sequence import Sequence
    from llmk.tokenizer import Tokenizer

log = get_logger("llmk.speculative")

#: Defaults, measured with bench/speculative.py on this project's 2-core CPU (SmolLM2-135M,
#: onnxruntime and openvino int4). A draft token costs a third of a decode step at batch 1,
#: half of one at batch 2, two thirds or more at batch 4 (the step turns compute-bound):
#: drafting at 4 decoding sequences gained only where every one copied its input, and lost
#: 7% on chat. Drafts of up to 8 with an adaptive length beat a fixed 4 (1.6-2.0x against
#: 1.3-1.6x on the grounded tasks); suffixes of 3+ tokens and a 0.5 acceptance floor keep
#: chat at 1.0x without losing the copies.
DEFAULT_NUM_DRAFT = 8
DEFAULT_NGRAM_MIN, DEFAULT_NGRAM_MAX = 3, 4
DEFAULT_MAX_BATCH = 2
#: A sequence pauses drafting after its acceptance falls below this, for 2, 4, ... steps (at most MAX_PAUSE).
DEFAULT_MIN_ACCEPTANCE = 0.5
#: The acceptance a fresh sequence expects before its first verification: it sizes the first
#: drafts where they cost (one token at llama.cpp's 0.45 of a step, two at 0.25). Expecting
#: every draft kept sent four on a chat prompt's first stray match, a loss of 4-9% there.
DEFAULT_INITIAL_ACCEPTANCE = 0.7
MAX_PAUSE = 64
#: Weight of the latest verification in a sequence's acceptance average.
ACCEPTANCE_WEIGHT = 0.5
#: Drafting must promise this many tokens per unit of step time (plain decoding: 1.0);
#: the margin covers what the estimate leaves out (verifying k + 1 rows of logits).
PAYS_FROM = 1.05


class DraftModelError(OptionsError):
    """A draft model that cannot draft for its target (another vocabulary, another task)."""

    def __init__(self, draft: str, reason: str):
        self.draft = draft
        super().__init__("draft", f"{draft!r} cannot draft for this model: {reason}")


class SpeculativeConfig(BaseModel):
    """The ``speculative:`` section of a model spec.

    ``method``: ``ngram`` (prompt lookup, the default), ``draft`` (the spec's
    ``draft`` model; implied when ``draft`` is given) or ``off``. YAML's ``off``
    and ``false`` turn it off too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram", "draft", "off"] = "ngram"
    num_draft: int = Field(DEFAULT_NUM_DRAFT, ge=1, le=32, description="tokens drafted per sequence and step")
    ngram_max: int = Field(DEFAULT_NGRAM_MAX, ge=1, le=16, description="longest suffix looked up in the prompt "
                                                                      "and output")
    ngram_min: int = Field(DEFAULT_NGRAM_MIN, ge=1, le=16, description="shortest suffix looked up")
    max_batch: int = Field(DEFAULT_MAX_BATCH, ge=0, le=256,
                           description="draft only while at most this many sequences decode (0: never)")
    min_acceptance: float = Field(DEFAULT_MIN_ACCEPTANCE, ge=0.0, le=1.0,
                                  description="a sequence whose drafts are accepted less often pauses drafting")
    initial_acceptance: float = Field(DEFAULT_INITIAL_ACCEPTANCE, ge=0.0, le=1.0,
                                      description="the acceptance a sequence expects before its first "
                                                  "verification (sizes its first drafts where cost_aware)")
    cost_aware: bool = Field(True, description="draft only as many tokens as a sequence's acceptance makes worth "
                                               "what a draft token costs on this runner (Runner.draft_token_cost)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``speculative: ngram``, ``speculative: off`` (YAML reads it as false), ``true``."""
        if isinstance(value, bool):
            return {} if value else {"method": "off"}
        if isinstance(value, str):
            return {"method": value}
        return value

    @model_validator(mode="after")
    def _sizes(self) -> SpeculativeConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) is larger than ngram_max ({self.ngram_max})")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "off" and self.max_batch > 0


# -- verification ----------------------------------------------------------------------


def verify(scores: np.ndarray, draft: int, params: SamplingParams, rng: np.random.Generator,
           q: np.ndarray | None = None) -> tuple[int, bool]:
    """The token to emit at a drafted position, and whether it is the draft.

    ``scores`` are the target's logits after the sequence's processors; ``q`` is
    the distribution the draft was sampled from (``None``: a point mass on it, as
    for n-gram drafts or greedy drafting). Greedy sequences keep the draft when it
    is the argmax and otherwise emit the argmax; sampled ones use rejection
    sampling, which emits tokens distributed exactly as ``p``.
    """
    import numpy as np

    from llmk.sampling import GREEDY_BELOW, probabilities

    if params.temperature < GREEDY_BELOW:
        token = int(np.argmax(scores))
        return token, token == draft
    p = probabilities(scores, params)
    if not 0 <= draft < p.shape[-1]:
        return int(rng.choice(p.shape[-1], p=p)), False
    if q is None:
        if rng.random() < p[draft]:
            return draft, True
        residual = p.copy()
        residual[draft] = 0.0
    else:
        q = _fit(q, p.shape[-1])
        if q[draft] > 0 and rng.random() * q[draft] < p[draft]:  # kept with probability min(1, p/q)
            return draft, True
        residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if not total > 0:  # p == q (or p is all on the draft): rejection had probability 0
        return draft, True
    return int(rng.choice(residual.shape[-1], p=residual / total)), False


def _fit(q: np.ndarray, width: int) -> np.ndarray:
    """``q`` over ``width`` tokens (a draft model's logits may be narrower or padded wider)."""
    import numpy as np

    if q.shape[-1] == width:
        return q
    if q.shape[-1] > width:
        return q[:width]
    return np.concatenate([q, np.zeros(width - q.shape[-1], dtype=q.dtype)])


# -- per-sequence state and statistics -------------------------------------------------------


class SequenceSpeculation:
    """One sequence's drafting state: its n-gram index, its draft length, its recent
    acceptance and pause, and (with a draft model) its share of the draft's KV cache.

    The draft length adapts: it doubles (up to ``num_draft``) after a step that kept
    every draft, and falls to one more than were kept after one that did not — a
    copied passage is drafted in long runs, a stray match costs little.
    """

    def __init__(self, num_draft: int = DEFAULT_NUM_DRAFT, acceptance: float = DEFAULT_INITIAL_ACCEPTANCE) -> None:
        self.index: NgramIndex | None = None
        self.length = max(1, num_draft // 2)  # drafts to ask for next
        self.acceptance = acceptance  # recent share of drafts kept (an exponential average)
        self.pause = 0  # decoding steps left without drafting
        self.failures = 0  # low-acceptance verifications in a row: each doubles the pause
        self.probing = False  # the next drafts, after a pause, are sent whatever they promise
        self.drafted = self.accepted = 0
        # With a draft model:
        self.draft_kv: KVAllocation | None = None
        self.draft_computed = 0  # positions of the draft's cache that hold final tokens
        self.draft_fed: list[int] = []  # drafts written to the draft's cache after those positions
        self.q: np.ndarray | None = None  # [drafts, vocab]: what each draft was sampled from

    def may_draft(self) -> bool:
        if self.pause:
            self.pause -= 1
            return False
        return True

    def rest(self) -> None:
        """Drafting does not pay at this acceptance: pause, for longer each time, then probe."""
        self.failures += 1
        self.pause = min(MAX_PAUSE, 2 ** self.failures)
        self.probing = True

    def record(self, drafted: int, accepted: int, config: SpeculativeConfig) -> None:
        """A verification: adapt the draft length and the acceptance average, pause
        when it is too low. Only drafting that was not a probe clears the failures: a
        probe that does not make drafting pay leads to a longer pause."""
        probe, self.probing = self.probing, False
        self.drafted += drafted
        self.accepted += accepted
        self.length = min(config.num_draft, self.length * 2) if accepted == drafted else accepted + 1
        self.acceptance += ACCEPTANCE_WEIGHT * (accepted / drafted - self.acceptance)
        if self.acceptance >= config.min_acceptance:
            if not probe:
                self.failures = 0
            return
        self.rest()
        self.acceptance = config.min_acceptance  # after the pause, one good verification resumes for good


def best_length(acceptance: float, cost: float, limit: int) -> int:
    """Drafts per step that bring the most tokens per unit of step time, when each draft
    is kept with probability ``acceptance`` (until the first that is not) and adds
    ``cost`` of a one-token step; 0 when no length promises ``PAYS_FROM`` or more."""
    best, best_gain = 0, PAYS_FROM
    expected = term = 1.0  # tokens a step emits: the bonus (or the correction) always
    for k in range(1, limit + 1):
        term *= acceptance
        expected += term
        gain = expected / (1.0 + cost * k)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


@dataclass
class SpeculationStats:
    """What speculation did for one model, since it loaded. Counters only grow."""

    method: str = "off"
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # of those, kept
    verify_steps: int = 0  # sequence-steps that verified drafts
    decode_steps: int = 0  # sequence-steps that decoded (with or without drafts)
    decode_tokens: int = 0  # tokens those steps emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a decoding sequence gained per engine step (1.0 without speculation)."""
        return self.decode_tokens / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"spec_method": self.method, "spec_draft_tokens": self.drafted, "spec_accepted_tokens": self.accepted,
                "spec_verify_steps": self.verify_steps, "spec_acceptance_rate": round(self.acceptance_rate, 4),
                "decode_steps": self.decode_steps, "decode_tokens": self.decode_tokens,
                "spec_tokens_per_step": round(self.tokens_per_step, 4)}


# -- proposers ---------------------------------------------------------------------------


class NgramIndex:
    """Where each n-gram (``lo <= n <= hi``) of a growing token list last ended,
    among those followed by at least one token. Kept up to date incrementally: a
    sequence's tokens only grow (drafts never enter it until they are kept)."""

    def __init__(self, lo: int, hi: int):
        self.sizes = range(hi, lo - 1, -1)  # longest first
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending before this position are indexed

    def lookup(self, tokens: Seq[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the
        longest suffix of ``tokens`` found."""
        last = len(tokens) - 1
        for end in range(self.indexed, last):  # every n-gram ending here has a following token
            for n in self.sizes:
                if end + 1 >= n:
                    self.ends[n][tuple(tokens[end + 1 - n:end + 1])] = end
        self.indexed = max(self.indexed, last)
        for n in self.sizes:
            if len(tokens) > n:
                end = self.ends[n].get(tuple(tokens[-n:]))
                if end is not None:
                    return list(tokens[end + 1:end + 1 + k])
        return []


class NgramProposer:
    """Drafts copied from the sequence's own prompt and output (prompt lookup)."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def start(self, sequence: Sequence) -> None:
        """A sequence joined the batch (nothing to reserve: its index is built when it first drafts)."""

    def end(self, sequence: Sequence) -> None:
        """A sequence left the batch."""

    def propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        drafts = []
        for sequence, k in rows:
            state = sequence.speculation
            assert state is not None
            if state.index is None:
                state.index = NgramIndex(self.config.ngram_min, self.config.ngram_max)
            drafts.append(state.index.lookup(sequence.token_ids, k))
        return drafts

    def verified(self, sequence: Sequence, length: int) -> None:
        """Tokens up to ``length`` are final now (the n-gram index needs no update)."""


class DraftModel:
    """Drafts from a smaller model with the target's vocabulary, on its own KV cache.

    ``kv`` manages the draft runner's cache with the target's slots (a sequence
    holds the same slot in both). Every step, the sequences that draft first catch
    up on the tokens the draft has not seen (at most ``chunk`` per step; a sequence
    still behind drafts nothing this step), then the draft runs ``k`` single-token
    steps for all of them together. ``lock`` is the engine's runner lock.
    """

    method = "draft"

    def __init__(self, runner: Runner, kv: KVCacheManager, lock: threading.Lock, *, vocab_size: int,
                 chunk: int = 256):
        self.runner, self.kv, self.lock = runner, kv, lock
        self.vocab_size, self.chunk = vocab_size, chunk

    def start(self, sequence: Sequence) -> None:
        state, allocation = sequence.speculation, sequence.kv
        assert state is not None and allocation is not None
        length = min(sequence.max_length, self.runner.max_context)
        state.draft_kv = self.kv.admit(sequence.prompt_ids, length, slot=allocation.slot)
        # (None: no room in the draft's cache; the sequence then decodes without drafts.)
        state.draft_computed = state.draft_kv.reused_tokens if state.draft_kv is not None else 0
        state.draft_fed = []

    def end(self, sequence: Sequence) -> None:
        state = sequence.speculation
        if state is not None and state.draft_kv is not None:
            self.kv.free(state.draft_kv)
            state.draft_kv = None

    def propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Catch up, then draft; greedy for greedy sequences, else sampled with the
        sequence's own parameters and generator (``state.q`` keeps the distributions)."""
        import numpy as np

        from llmk.sampling import GREEDY_BELOW, probabilities

        drafts: list[list[int]] = [[] for _ in rows]
        probs: list[list[np.ndarray]] = [[] for _ in rows]
        # Drafts d1..dk need d1..d(k-1) in the draft's cache: positions up to length + k - 2.
        wanted = [min(k, self.runner.max_context - len(sequence.token_ids) + 1) for sequence, k in rows]
        active: list[int] = []
        steps: list[SequenceStep] = []
        for i, (sequence, _) in enumerate(rows):
            state = sequence.speculation
            assert state is not None
            state.q, state.draft_fed = None, []
            length = len(sequence.token_ids)
            if state.draft_kv is None or wanted[i] <= 0:
                continue
            end = min(length, state.draft_computed + self.chunk)
            self.kv.ensure(state.draft_kv, end)
            steps.append(SequenceStep(state.draft_kv.slot, sequence.token_ids[state.draft_computed:end],
                                      state.draft_computed, state.draft_kv.blocks, logits=int(end == length)))
            state.draft_computed = end
            self.kv.commit(state.draft_kv, sequence.token_ids, end)
            if end == length:
                active.append(i)
        while steps:
            with self.lock:
                logits = self.runner.forward(steps)
            steps, following = [], []
            for row, i in enumerate(active):
                sequence = rows[i][0]
                state = sequence.speculation
                assert state is not None and state.draft_kv is not None
                scores = logits[row, :self.vocab_size]
                if sequence.params.temperature < GREEDY_BELOW:
                    token = int(np.argmax(scores))
                else:
                    q = probabilities(scores, sequence.params)
                    token = int(sequence.rng.choice(q.shape[-1], p=q))
                    probs[i].append(q)
                drafts[i].append(token)
                if len(drafts[i]) >= wanted[i]:
                    continue
                position = len(sequence.token_ids) + len(drafts[i]) - 1
                self.kv.ensure(state.draft_kv, position + 1)
                steps.append(SequenceStep(state.draft_kv.slot, [token], position, state.draft_kv.blocks))
                state.draft_fed.append(token)
                following.append(i)
            active = following
        for i, (sequence, _) in enumerate(rows):
            if probs[i]:
                state = sequence.speculation
                assert state is not None
                state.q = np.stack(probs[i])
        return drafts

    def verified(self, sequence: Sequence, length: int) -> None:
        """The sequence's first ``length`` tokens are final: the draft's cache stays
        valid up to the drafts it was fed that were kept."""
        state = sequence.speculation
        if state is None or state.draft_kv is None:
            return
        kept = 0
        tokens = sequence.token_ids
        for offset, token in enumerate(state.draft_fed):
            position = state.draft_computed + offset
            if position >= length or tokens[position] != token:
                break
            kept += 1
        state.draft_computed += kept
        state.draft_fed = []


Proposer = NgramProposer | DraftModel


class Speculator:
    """What the scheduler asks of speculation: drafts for this step's decoding
    sequences, and what to record once they are verified."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None, *,
                 draft_cost: float = Runner.draft_token_cost):
        if config.method == "draft" and not isinstance(proposer, DraftModel):
            raise OptionsError("speculative", "method 'draft' needs a draft model (draft: SOURCE on the model)")
        self.config = config
        self.proposer = proposer if config.enabled else None
        if self.proposer is None and config.method == "ngram" and config.enabled:
            self.proposer = NgramProposer(config)
        self.stats = SpeculationStats(method=config.method if self.proposer is not None else "off")
        self.draft_cost = draft_cost

    def start(self, sequence: Sequence) -> None:
        """A sequence was admitted (its target KV allocated)."""
        if self.proposer is None:
            return
        sequence.speculation = SequenceSpeculation(self.config.num_draft, self.config.initial_acceptance)
        self.proposer.start(sequence)

    def end(self, sequence: Sequence) -> None:
        if self.proposer is not None:
            self.proposer.end(sequence)

    def propose(self, sequences: list[Sequence]) -> list[list[int]]:
        """Drafts for each decoding sequence (empty where it does not draft): none
        while more than ``max_batch`` decode; at most the sequence's draft length,
        never past its budget (the bonus token must fit too), none while it is paused."""
        if self.proposer is None or len(sequences) > self.config.max_batch:
            return [[] for _ in sequences]
        rows, where = [], []
        for i, sequence in enumerate(sequences):
            state = sequence.speculation
            if state is None:
                continue
            k = min(state.length, sequence.budget - len(sequence.output_ids) - 1)
            if k <= 0 or not state.may_draft():
                continue
            if self.config.cost_aware and not state.probing:
                k = min(k, best_length(state.acceptance, self.draft_cost, self.config.num_draft))
                if k == 0:
                    state.rest()
                    continue
            rows.append((sequence, k))
            where.append(i)
        drafts: list[list[int]] = [[] for _ in sequences]
        if rows:
            for i, found in zip(where, self.proposer.propose(rows)):
                drafts[i] = found
        return drafts

    def verified(self, sequence: Sequence, drafted: int, accepted: int, emitted: int) -> None:
        """A decoding step of ``sequence`` is done: ``drafted`` drafts, ``accepted``
        of them kept, ``emitted`` tokens pushed in all."""
        stats = self.stats
        stats.decode_steps += 1
        stats.decode_tokens += emitted
        if not drafted:
            return
        stats.drafted += drafted
        stats.accepted += accepted
        stats.verify_steps += 1
        state = sequence.speculation
        if state is not None:
            state.record(drafted, accepted, self.config)
        if self.proposer is not None:
            self.proposer.verified(sequence, len(sequence.token_ids))

    def draft_probabilities(self, sequence: Sequence) -> np.ndarray | None:
        """What the drafts in flight were sampled from (``None``: point masses)."""
        state = sequence.speculation
        return None if state is None else state.q


def check_draft_vocabulary(target: Tokenizer, draft: Tokenizer, draft_source: str) -> None:
    """Refuse a draft model whose tokens are not the target's (``DraftModelError``)."""
    if draft.vocab_size != target.vocab_size:
        raise DraftModelError(draft_source, f"its vocabulary has {draft.vocab_size} tokens, the model's "
                                            f"{target.vocab_size}; a draft model needs the same tokenizer")
    ours, theirs = target.hf_tokenizer.get_vocab(), draft.hf_tokenizer.get_vocab()
    if ours != theirs:
        differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
        raise DraftModelError(draft_source, f"its tokens differ from the model's (e.g. {differing}); a draft "
                                            "model needs the same tokenizer")
