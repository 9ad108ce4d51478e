"""Constrained decoding: outputs that must match a JSON schema, a regular
expression or a grammar (Lark, or llama.cpp's GBNF).

The grammar engine is llguidance (what llama.cpp and vLLM use), chosen over
xgrammar by measurement on SmolLM2's 49,152-token vocabulary (docs/BENCHMARKS.md):
both compute a step's mask in well under 1% of a decode step (llguidance 25-80 µs,
xgrammar 5-9 µs), and llguidance alone reads Lark as well as GBNF, JSON schema and
regex, and compiles a grammar in about a millisecond without a cache.

A sequence's ``GrammarMask`` is the last of its logits processors: at each step
it feeds the grammar the tokens generated since the previous step, then keeps
only the tokens the grammar allows next. When the grammar is complete only the
end-of-sequence token remains, so the output stops there.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llmk.errors import OptionsError

if TYPE_CHECKING:
    import numpy as np

    from llmk.sampling import SamplingParams
    from llmk.tokenizer import Tokenizer

#: Compact JSON: a small model offered free whitespace may spend its tokens on it.
JSON_DEFAULTS = {"whitespace_flexible": False}

_grammar_tokenizers: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def grammar_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of a tokenizer (built once per tokenizer: ~0.5 s for 49k tokens)."""
    with _lock:
        found = _grammar_tokenizers.get(tokenizer)
        if found is None:
            import llguidance.hf

            found = llguidance.hf.from_tokenizer(tokenizer.hf_tokenizer, n_vocab=tokenizer.vocab_size,
                                                 eos_token=sorted(tokenizer.eos_ids))
            _grammar_tokenizers[tokenizer] = found
        return found


def grammar_text(params: SamplingParams) -> tuple[str, str] | None:
    """The llguidance grammar for ``params``' constraint and the parameter it came
    from, or ``None`` when unconstrained. Raises ``OptionsError`` for bad input."""
    import llguidance

    try:
        if params.json_schema is not None:
            schema = generation_schema(params.json_schema)
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS), \
                "json_schema"
        if params.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(params.regex), "regex"
        if params.grammar is not None:
            return llguidance.grammar_from("grammar", params.grammar), "grammar"
    except (ValueError, TypeError) as error:
        raise OptionsError(_which(params), f"cannot compile it: {error}") from None
    return None


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalItems", "contains", "not", "if", "then", "else", "unevaluatedItems")


#: The widest numbers a generation may write: 15 digits before the point, 9 after.
NUMBER_LIMIT, NUMBER_STEP = 10**15, 1e-9


def generation_schema(schema: Any) -> Any:
    """The schema a generation is held to: ``schema`` narrowed so that a small model
    cannot wander off or loop, while every output stays valid against ``schema``:
    objects that name their properties get ``additionalProperties: false`` where
    they say nothing about other keys (OpenAI's strict mode requires the same of
    the schema itself), and numbers without bounds or a step get at most 15 digits
    before the point and 9 after (a greedy 135M model otherwise writes digits
    until ``max_tokens``)."""
    if not isinstance(schema, dict):
        return schema
    narrowed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(narrowed.get(key), dict):
            narrowed[key] = {name: generation_schema(sub) for name, sub in narrowed[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(narrowed.get(key), list):
            narrowed[key] = [generation_schema(sub) for sub in narrowed[key]]
    for key in _SCHEMA_VALUES:
        if key in narrowed:
            narrowed[key] = generation_schema(narrowed[key])
    if "properties" in narrowed and "additionalProperties" not in narrowed and "patternProperties" not in narrowed:
        narrowed["additionalProperties"] = False
    types = narrowed.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if types & {"number", "integer"}:
        if "maximum" not in narrowed and "exclusiveMaximum" not in narrowed:
            narrowed["maximum"] = NUMBER_LIMIT
        if "minimum" not in narrowed and "exclusiveMinimum" not in narrowed:
            narrowed["minimum"] = -NUMBER_LIMIT
        if "number" in types and "multipleOf" not in narrowed:
            narrowed["multipleOf"] = NUMBER_STEP
    return narrowed


def schema_prompt(schema: dict[str, Any]) -> str:
    """What a chat's system message says about a required JSON schema: small models
    choose far better values (and stop) when they can read it."""
    return "Answer with JSON that follows this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)


def _which(params: SamplingParams) -> str:
    return "json_schema" if params.json_schema is not None else "regex" if params.regex is not None else "grammar"


def grammar_mask(params: SamplingParams, tokenizer: Tokenizer) -> GrammarMask | None:
    """The token mask of ``params``' constraint for one sequence (``None`` when unconstrained)."""
    found = grammar_text(params)
    if found is None:
        return None
    grammar, field = found
    import llguidance

    tokens = grammar_tokenizer(tokenizer)
    error = llguidance.LLMatcher.validate_grammar(grammar, tokens)
    if error:
        raise OptionsError(field, f"cannot compile it: {error}")
    matcher = llguidance.LLMatcher(tokens, grammar)
    if matcher.is_error():
        raise OptionsError(field, f"cannot compile it: {matcher.get_error()}")
    return GrammarMask(matcher, tokenizer.vocab_size)


class GrammarError(OptionsError):
    """The output left the grammar (a token forced past the mask, e.g. by a caller's processor)."""


class GrammarMask:
    """A logits processor that keeps only the tokens a grammar allows next.
    It holds the grammar's state, so each sequence has its own."""

    def __init__(self, matcher: Any, vocab_size: int):
        import llguidance.numpy

        self.matcher = matcher
        self.consumed = 0  # output tokens fed to the grammar
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)

    def __call__(self, output_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        import llguidance.numpy
        import numpy as np

        new = list(output_ids[self.consumed:])
        if new and self.matcher.consume_tokens(new) is False or self.matcher.is_error():
            raise GrammarError("grammar", f"the output left the grammar: {self.matcher.get_error()}")
        self.consumed = len(output_ids)
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # Bits to booleans and one select: ~5x faster than llguidance's NumPy apply on 49k tokens.
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little").view(bool)
        vocab = logits.shape[-1]
        if allowed.shape[-1] < vocab:  # the model's rows past the tokenizer's vocabulary: never allowed
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.shape[-1], dtype=bool)])
        return np.where(allowed[:vocab], logits, np.float32(-np.inf))

    def rollback(self, tokens: int) -> None:
        """Forget the last ``tokens`` consumed (a rejected speculative draft)."""
        self.matcher.rollback(tokens)
        self.consumed -= tokens
