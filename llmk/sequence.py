"""``Sequence``: one prompt being completed, as the engine and the scheduler see it.

It holds the token ids (prompt and output), the sampling state (parameters,
processors, its own random generator), the text handed out so far and the stop
logic, and where the sequence stands in the engine: how many of its positions
are in the KV cache (``computed``), which cache blocks hold them (``kv``) and its
drafting state (``speculation``, ``llmk.speculative``).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from llmk.tokenizer import Detokenizer, Tokenizer

if TYPE_CHECKING:
    from llmk.kv import KVAllocation
    from llmk.sampling import LogitsProcessor, SamplingParams, TokenLogprob
    from llmk.speculative import SequenceSpeculation
    from llmk.tools import ToolCall

#: stop: end of sequence or a stop string; length: max_tokens or the context; cancelled:
#: the caller stopped it; timeout: its deadline passed; tool_calls: the answer is tool calls.
FinishReason = Literal["stop", "length", "cancelled", "timeout", "tool_calls"]


@dataclass(frozen=True, eq=False)
class Adapter:
    """A LoRA adapter loaded into a model's runner, as the sequences that use it carry it."""

    name: str
    path: str
    #: What ``Runner.load_adapter`` returned; steps pass it back (``SequenceStep.adapter``).
    weights: object
    #: Its prefix-cache root (``KVAllocation.root``): unique to this load of the adapter.
    root: bytes


@dataclass
class StreamChunk:
    """A piece of a streamed completion; the last one carries ``finish_reason``."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    #: One per token in ``token_ids``, when the request asked for ``logprobs``.
    logprobs: list[TokenLogprob] | None = None
    #: Tool calls completed in this piece (``llmk.tools``; chat with ``tools`` only).
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def join(cls, chunks: list[StreamChunk]) -> StreamChunk:
        """One chunk for the tokens of one engine step (a step that kept drafts pushes several)."""
        if len(chunks) == 1:
            return chunks[0]
        logprobs = [p for c in chunks for p in c.logprobs or ()] if chunks[0].logprobs is not None else None
        return cls("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                   chunks[-1].finish_reason, logprobs, [call for c in chunks for call in c.tool_calls])


class Sequence:
    """A prompt and its completion, from submission to its last token."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, max_context: int,
                 processors: Seq[LogitsProcessor] = (), adapter: Adapter | None = None):
        import numpy as np

        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.adapter = adapter
        self.processors = _pipeline(params, self.prompt_ids, tokenizer, processors)
        self.rng = np.random.default_rng(params.seed)
        #: Prompt then output ids: what the KV cache holds (up to ``computed``) and will hold.
        self.token_ids = list(prompt_ids)
        self.text = ""  # everything decoded so far, stop sequences not yet cut
        self.emitted = 0  # how much of ``text`` was handed out
        self.finish: FinishReason | None = None
        #: Most tokens this sequence may generate (``max_tokens``, bounded by the context).
        self.budget = min(params.max_tokens, max_context - len(prompt_ids))
        #: Positions whose keys and values are in the cache.
        self.computed = 0
        #: Its cache blocks, from admission until it finishes.
        self.kv: KVAllocation | None = None
        #: Its drafting state while it runs, when the model speculates.
        self.speculation: SequenceSpeculation | None = None
        self._detok = Detokenizer(tokenizer, prompt_ids)
        self._eos = tokenizer.eos_ids
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def max_length(self) -> int:
        """Positions the sequence may reach: its prompt plus its budget."""
        return len(self.prompt_ids) + self.budget

    @property
    def prefilling(self) -> bool:
        """Part of the prompt is not in the cache yet."""
        return self.computed < len(self.prompt_ids)

    @property
    def pending_prompt(self) -> int:
        return max(0, len(self.prompt_ids) - self.computed)

    def push(self, token: int, logprob: TokenLogprob | None = None) -> StreamChunk:
        """Append a sampled token; return the text it completes (held back while
        it could still become a stop string) and, on the last token, the reason."""
        self.token_ids.append(token)
        if token in self._eos:
            self.finish = "stop"
        else:
            self.text += self._detok.push(token)
            # Emitted text never holds a whole stop sequence, so search only what is new.
            cuts = [c for c in (self.text.find(s, self.emitted) for s in self.params.stop) if c != -1]
            if cuts:
                self.text, self.finish = self.text[:min(cuts)], "stop"
        if self.finish is None and len(self.output_ids) >= self.budget:
            self.finish = "length"
        end = len(self.text) if self.finish or not self.params.stop else max(self.emitted, len(self.text) - self._hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return StreamChunk(piece, [token], self.finish, None if logprob is None else [logprob])

    def stop(self, reason: FinishReason) -> StreamChunk:
        """End the sequence without a new token (cancelled, timed out)."""
        self.finish = reason
        return StreamChunk("", [], reason)


def _pipeline(params: SamplingParams, prompt_ids: list[int], tokenizer: Tokenizer,
              processors: Seq[LogitsProcessor]) -> tuple[LogitsProcessor, ...]:
    """The sequence's logits processors: penalties, biases, the caller's, then the
    grammar's mask, last so that nothing re-enables a token it forbids."""
    from llmk.sampling import LogitBias, Penalties

    pipeline: list[LogitsProcessor] = []
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        pipeline.append(Penalties(params, prompt_ids))
    if params.logit_bias:
        pipeline.append(LogitBias(params.logit_bias, tokenizer.vocab_size))
    pipeline.extend(processors)
    if params.constrained:
        from llmk.constraints import grammar_mask

        mask = grammar_mask(params, tokenizer)
        if mask is not None:
            pipeline.append(mask)
    return tuple(pipeline)
