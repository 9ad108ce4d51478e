"""Generation, scoring and embedding: the tiny Llama and BERT on the torch backend,
the fake backend where exact control helps, and the pure sampling function."""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import llmk
from llmk.errors import OptionsError, UnsupportedError
from llmk.generation import SamplingParams, sample
from llmk.testing import load_fake
from llmk.tokenizer import Detokenizer, Tokenizer

PROMPTS = ["The cat walks to", "Once upon a time there was a little fox who lived", "Hi"]


@pytest.fixture(scope="module")
def models(tiny_llama: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    import torch

    threads = torch.get_num_threads()
    kernel = llmk.Kernel(autoload=False, cache_dir=tmp_path_factory.mktemp("cache"), drain_timeout=10)
    # One thread: on tiny models, thread hand-offs cost ten times the arithmetic.
    kernel.load("llama", str(tiny_llama), backend="torch", options={"threads": 1})
    kernel.load("bert", str(tiny_bert), backend="torch", options={"threads": 1})
    yield kernel
    kernel.close()
    torch.set_num_threads(threads)


@pytest.fixture
def llama(models):
    return models.get("llama")


@pytest.fixture
def bert(models):
    return models.get("bert")


@pytest.fixture(scope="module")
def hf(tiny_llama: Path):
    """The same model and tokenizer, straight from transformers: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval(), AutoTokenizer.from_pretrained(str(tiny_llama))


def greedy(handle, prompt, n=16, **params):
    return handle.generate(prompt, max_tokens=n, temperature=0, **params)


# -- greedy and sampling --------------------------------------------------------------


def test_greedy_is_deterministic_and_matches_transformers(llama, hf):
    import torch

    model, tok = hf
    for prompt in PROMPTS:
        result = greedy(llama, prompt, 20)
        assert greedy(llama, prompt, 20).token_ids == result.token_ids
        ids = tok.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        assert result.token_ids == out[0, len(ids):].tolist()
        assert result.prompt_tokens == len(ids)
        assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)
        assert result.finish_reason == "length" and result.completion_tokens == 20


def test_seeded_sampling_is_reproducible_and_seeds_differ(llama):
    runs = {seed: llama.generate(PROMPTS[0], max_tokens=24, temperature=1.0, seed=seed).token_ids for seed in (1, 2)}
    assert llama.generate(PROMPTS[0], max_tokens=24, temperature=1.0, seed=1).token_ids == runs[1]
    assert runs[1] != runs[2]
    assert runs[1] != greedy(llama, PROMPTS[0], 24).token_ids


def test_seeded_sampling_in_a_batch_equals_alone(llama):
    alone = [llama.generate(p, max_tokens=10, temperature=0.9, seed=7).token_ids for p in PROMPTS]
    batch = llama.generate(PROMPTS, max_tokens=10, temperature=0.9, seed=7)
    assert [r.token_ids for r in batch] == alone


def test_a_batch_of_different_lengths_equals_each_prompt_alone(llama):
    alone = [greedy(llama, p, 12) for p in PROMPTS]
    batch = llama.generate(PROMPTS, max_tokens=12, temperature=0)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in alone]


def test_sequences_leaving_a_batch_early_do_not_disturb_the_others(llama):
    # Different budgets make rows finish at different steps: the runner drops them
    # from its KV cache (DecodeState.select) while the others keep going.
    engine = llama.version.engine
    ids = [engine.prompt_ids(p) for p in PROMPTS]
    budgets = [3, 14, 7]
    params = [SamplingParams.build(max_tokens=n, temperature=0) for n in budgets]
    batch = engine.generate(ids, params)
    for prompt, n, result in zip(PROMPTS, budgets, batch):
        assert result.token_ids == greedy(llama, prompt, n).token_ids
        assert len(result.token_ids) == n and result.finish_reason == "length"


# -- the sampling function ---------------------------------------------------------------


def draws(logits, n=1000, seed=0, **params):
    rng = np.random.default_rng(seed)
    p = SamplingParams.build(**params)
    return np.array([sample(np.asarray(logits, dtype=np.float32), p, rng) for _ in range(n)])


def test_sample_temperature_zero_is_argmax():
    assert set(draws([0.1, 3.0, 2.9, -1.0], n=50, temperature=0)) == {1}


def test_sample_follows_the_softmax_of_logits_over_temperature():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    for temperature in (1.0, 2.0, 0.5):
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        seen = np.bincount(draws(logits, n=4000, temperature=temperature), minlength=4) / 4000
        assert np.abs(seen - expected).max() < 0.03, (temperature, seen, expected)


def test_sample_low_temperature_concentrates_and_high_spreads():
    logits = [2.0, 1.0, 0.0, -1.0]
    assert (draws(logits, temperature=0.05) == 0).mean() > 0.99
    assert len(set(draws(logits, temperature=5.0))) == 4


def test_sample_top_k_keeps_the_k_best():
    logits = [1.0, 3.0, 2.0, 0.5, 2.5]
    assert set(draws(logits, temperature=5.0, top_k=1)) == {1}
    assert set(draws(logits, temperature=5.0, top_k=2)) == {1, 4}
    assert set(draws(logits, temperature=5.0, top_k=0)) == {0, 1, 2, 3, 4}
    assert set(draws(logits, temperature=5.0, top_k=99)) == {0, 1, 2, 3, 4}


def test_sample_top_p_keeps_the_smallest_nucleus_and_renormalizes():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    picked = draws(logits, n=4000, temperature=1.0, top_p=0.6)
    assert set(picked) == {0, 1}
    assert abs((picked == 0).mean() - 0.5 / 0.8) < 0.03
    assert set(draws(logits, temperature=1.0, top_p=0.9)) == {0, 1, 2}
    assert set(draws(logits, temperature=1.0, top_p=0.3)) == {0}
    assert set(draws(logits, temperature=1.0, top_p=1.0)) == {0, 1, 2, 3}


def test_sample_top_k_and_top_p_combine():
    logits = np.log([0.4, 0.3, 0.2, 0.1])
    # top_k=3 renormalizes to 4/9, 3/9, 2/9; top_p=0.7 then keeps the first two.
    assert set(draws(logits, temperature=1.0, top_k=3, top_p=0.7)) == {0, 1}


def test_sample_same_rng_seed_same_draws():
    logits = np.linspace(0, 1, 50)
    assert (draws(logits, n=100, seed=3) == draws(logits, n=100, seed=3)).all()
    assert (draws(logits, n=100, seed=3) != draws(logits, n=100, seed=4)).any()


# -- stop sequences, lengths and streaming -----------------------------------------------


def stop_from(text: str) -> str:
    """A 4-character stop string from the middle of ``text`` that does not occur earlier."""
    for start in range(len(text) // 3, len(text) - 4):
        candidate = text[start:start + 4]
        if text.find(candidate) == start and candidate.strip():
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_sequence_cuts_the_text_and_finishes_with_stop(llama):
    full = greedy(llama, PROMPTS[1], 40)
    stop = stop_from(full.text)
    result = greedy(llama, PROMPTS[1], 40, stop=stop)
    assert result.text == full.text[:full.text.index(stop)]
    assert result.finish_reason == "stop"
    assert len(result.token_ids) < len(full.token_ids)
    assert result.token_ids == full.token_ids[:len(result.token_ids)]
    # The token that completed the stop string is the last one generated.
    assert stop in llama.version.engine.tokenizer.decode(full.token_ids[:len(result.token_ids)])
    assert stop not in llama.version.engine.tokenizer.decode(full.token_ids[:len(result.token_ids) - 1])


def test_the_earliest_of_several_stop_sequences_wins(llama):
    full = greedy(llama, PROMPTS[1], 40).text
    late, early = stop_from(full[len(full) // 2:]), stop_from(full[: len(full) // 2])
    result = greedy(llama, PROMPTS[1], 40, stop=[late, "never seen here", early])
    assert result.text == full[:full.index(early)] and result.finish_reason == "stop"


def test_a_stop_sequence_that_never_occurs_changes_nothing(llama):
    full = greedy(llama, PROMPTS[0], 20)
    result = greedy(llama, PROMPTS[0], 20, stop=["\u00a7never\u00a7"])
    assert (result.text, result.token_ids, result.finish_reason) == (full.text, full.token_ids, "length")


def test_streaming_never_emits_text_that_a_stop_sequence_cuts(llama):
    full = greedy(llama, PROMPTS[1], 40).text
    for stop in (stop_from(full), full[len(full) // 2] + "\u00a7"):  # the second one only starts to match
        final = greedy(llama, PROMPTS[1], 40, stop=stop)
        shown = ""
        chunks = list(llama.stream(PROMPTS[1], max_tokens=40, temperature=0, stop=stop))
        for chunk in chunks:
            shown += chunk.text
            assert final.text.startswith(shown), (stop, shown)
        assert shown == final.text
        assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [final.finish_reason]


def test_max_tokens_finishes_with_length(llama):
    for n in (1, 5):
        result = greedy(llama, PROMPTS[0], n)
        assert result.finish_reason == "length" and len(result.token_ids) == n


def test_streamed_pieces_concatenate_to_the_generated_text(llama):
    result = greedy(llama, PROMPTS[1], 30)
    chunks = list(llama.stream(PROMPTS[1], max_tokens=30, temperature=0))
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert len([c for c in chunks if c.text]) > 1  # it really streams


def test_generate_counts_requests_and_tokens(llama):
    before = llama.status()
    result = greedy(llama, PROMPTS[0], 4)
    after = llama.status()
    assert after["requests"] == before["requests"] + 1
    assert after["tokens_in"] == before["tokens_in"] + result.prompt_tokens
    assert after["tokens_out"] == before["tokens_out"] + 4
    assert after["active_requests"] == 0


# -- the fake backend: exact control ---------------------------------------------------------


def test_eos_finishes_with_stop_and_is_not_in_the_text(kernel):
    handle = load_fake(kernel, options={"eos_at": 3})
    runner = handle.version.engine.runner
    result = handle.generate("Hello", max_tokens=10, temperature=0)
    assert result.finish_reason == "stop"
    assert len(result.token_ids) == 3 and result.token_ids[-1] == runner.eos_id
    expected = runner.expected(handle.version.engine.prompt_ids("Hello"), 10)
    assert result.token_ids == expected
    assert result.text == handle.version.engine.tokenizer.decode(expected[:2])


def test_rows_finishing_on_eos_leave_the_batch_cleanly(kernel):
    # eos_at counts generated tokens, so rows with smaller budgets leave first.
    handle = load_fake(kernel, options={"eos_at": 6})
    engine = handle.version.engine
    prompts = [engine.prompt_ids(p) for p in PROMPTS]
    params = [SamplingParams.build(max_tokens=n, temperature=0) for n in (2, 9, 4)]
    batch = engine.generate(prompts, params)
    assert [r.finish_reason for r in batch] == ["length", "stop", "length"]
    for prompt, param, result in zip(prompts, params, batch):
        assert result.token_ids == engine.generate([prompt], [param])[0].token_ids


def test_the_context_window_bounds_the_completion(kernel):
    handle = load_fake(kernel, options={"max_context": 16})
    ids = handle.version.engine.prompt_ids("The cat walks to the river")
    result = handle.generate("The cat walks to the river", max_tokens=100, temperature=0)
    assert len(result.token_ids) == 16 - len(ids) and result.finish_reason == "length"
    with pytest.raises(OptionsError, match="context"):
        handle.generate("The cat walks to the river " * 5, max_tokens=1)


def test_perplexity_over_windows_counts_every_token_once(kernel):
    # The fake's logits depend on its last 8 tokens only (memory_span), fewer than the
    # overlap of two windows, so scoring in windows must give exactly the full-sequence value.
    handle = load_fake(kernel, options={"max_context": 16})
    engine = handle.version.engine
    text = " ".join(llmk.testing.tiny_corpus()[:6])
    ids = engine.tokenizer.encode(text)
    assert len(ids) > 4 * 16
    runner = engine.runner
    rows = np.stack([runner.row(ids[:t + 1]) for t in range(len(ids) - 1)]).astype(np.float64)
    nll = np.log(np.exp(rows).sum(axis=1)) - rows[np.arange(len(ids) - 1), ids[1:]]
    assert handle.perplexity(text) == pytest.approx(math.exp(nll.mean()), rel=1e-9)


def test_perplexity_is_lower_on_text_the_model_predicts(kernel):
    handle = load_fake(kernel)
    predicted = handle.generate("The", max_tokens=40, temperature=0).text
    assert handle.perplexity("The" + predicted) < handle.perplexity("The cat walks to the river every day.") / 10


# -- perplexity and embeddings on real models --------------------------------------------------------


def test_perplexity_equals_exp_mean_nll_from_transformers(llama, hf):
    import torch

    model, tok = hf
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        reference = math.exp(model(ids, labels=ids).loss.item())
    value = llama.perplexity(text)
    assert math.isfinite(value) and value > 1
    assert value == pytest.approx(reference, rel=1e-4)
    with pytest.raises(OptionsError, match="two tokens"):
        llama.perplexity("")


def test_embeddings_are_unit_norm_and_batch_equals_one_by_one(bert):
    texts = ["hello world", "The cat walks to the river every day, and then goes back to the city.", "a"]
    batch = np.array(bert.embed(texts))
    assert batch.shape == (3, 32)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)
    single = np.array([bert.embed(t)[0] for t in texts])
    assert np.abs(batch - single).max() < 1e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    assert bert.embed([]) == []


def test_embeddings_are_mean_pooled_like_sentence_transformers(bert, tiny_bert):
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["hello world", "The old clock on the tower struck seven"]
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][:, :, None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    reference = torch.nn.functional.normalize(pooled, dim=1).numpy()
    assert np.abs(np.array(bert.embed(texts)) - reference).max() < 1e-5


def test_embeddings_ignore_padding(kernel):
    # The fake runner fills padded positions with 1000: any leak shows.
    handle = load_fake(kernel, "emb", source="fake-embed:emb")
    texts = ["hi", "a much longer sentence than the first one"]
    batch = np.array(handle.embed(texts))
    assert np.abs(batch - np.array([handle.embed(t)[0] for t in texts])).max() < 1e-6


def test_chat_applies_the_chat_template(llama, hf):
    _, tok = hf
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    template_ids = tok.encode(rendered, add_special_tokens=False)
    result = llama.chat(messages, max_tokens=8, temperature=0)
    assert result.prompt_tokens == len(template_ids)
    engine = llama.version.engine
    (expected,) = engine.generate([template_ids], [SamplingParams.build(max_tokens=8, temperature=0)])
    assert result.token_ids == expected.token_ids
    assert result.token_ids != greedy(llama, "Hi", 8).token_ids
    streamed = list(llama.chat_stream(messages, max_tokens=8, temperature=0))
    assert "".join(c.text for c in streamed) == result.text


def test_chat_without_a_template_is_unsupported(models, tiny_llama, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    (plain / "chat_template.jinja").unlink()
    handle = models.load("plain", str(plain), backend="torch")
    try:
        with pytest.raises(UnsupportedError, match="chat template"):
            handle.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
        assert handle.status()["active_requests"] == 0
    finally:
        models.unload("plain")


@pytest.mark.parametrize(
    "messages", [[], [{"role": "user"}], [{"content": "hi"}], [{"role": "user", "content": 3}], ["hi"]]
)
def test_bad_chat_messages_are_refused(llama, messages):
    with pytest.raises(OptionsError):
        llama.chat(messages, max_tokens=2)


def test_the_wrong_task_is_unsupported(llama, bert):
    with pytest.raises(UnsupportedError):
        llama.embed(["hello"])
    with pytest.raises(UnsupportedError):
        bert.generate("hello", max_tokens=2)
    with pytest.raises(UnsupportedError):
        list(bert.stream("hello", max_tokens=2))
    assert bert.status()["active_requests"] == 0 and llama.status()["active_requests"] == 0


def test_perplexity_on_an_embedding_model_is_unsupported(bert):
    with pytest.raises(UnsupportedError):
        bert.perplexity("The cat walks to the river.")


@pytest.mark.parametrize(
    "params",
    [{"temperature": -1}, {"temperature": 9}, {"max_tokens": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1},
     {"stop": 3}],
)
def test_invalid_params_are_refused(llama, params):
    with pytest.raises(OptionsError) as info:
        llama.generate("Hi", **params)
    assert next(iter(params)) in str(info.value)
    with pytest.raises(OptionsError):
        llama.stream("Hi", **params)  # at the call, not at the first chunk
    with pytest.raises(OptionsError):
        llama.chat([{"role": "user", "content": "Hi"}], **params)


@pytest.mark.parametrize("stop", ["", ["\n", ""]])
def test_an_empty_stop_sequence_is_refused(llama, stop):
    # An empty string "occurs" everywhere: it would end every completion at once.
    with pytest.raises(OptionsError, match="stop"):
        llama.generate("Hi", max_tokens=4, stop=stop)


def test_unknown_params_are_refused(llama):
    with pytest.raises(OptionsError, match="max_new_tokens"):
        llama.generate("Hi", max_new_tokens=3)
    with pytest.raises(OptionsError, match="max_new_tokens"):
        llama.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3)
    with pytest.raises(OptionsError, match="max_new_tokens"):
        llama.stream("Hi", max_new_tokens=3)
    with pytest.raises(OptionsError, match="no prompts"):
        llama.generate([], max_tokens=2)
    assert llama.status()["active_requests"] == 0


def test_a_prompt_longer_than_the_context_is_refused(llama):
    with pytest.raises(OptionsError, match="the model's context holds at most 255"):
        llama.generate("The cat walks to the river. " * 60, max_tokens=2)


# -- async ------------------------------------------------------------------------------------------


def test_async_variants(llama, bert):
    async def main():
        one = await llama.agenerate(PROMPTS[0], max_tokens=6, temperature=0)
        many = await llama.agenerate(PROMPTS, max_tokens=6, temperature=0)
        chunks = [c async for c in llama.astream(PROMPTS[0], max_tokens=6, temperature=0)]
        chat = await llama.achat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        chat_chunks = [c async for c in llama.achat_stream([{"role": "user", "content": "Hi"}], max_tokens=4,
                                                           temperature=0)]
        vectors = await bert.aembed(["hello", "world"])
        ppl = await llama.aperplexity("The cat walks to the river.")
        return one, many, chunks, chat, chat_chunks, vectors, ppl

    one, many, chunks, chat, chat_chunks, vectors, ppl = asyncio.run(main())
    assert one.token_ids == greedy(llama, PROMPTS[0], 6).token_ids
    assert [r.token_ids for r in many] == [greedy(llama, p, 6).token_ids for p in PROMPTS]
    assert "".join(c.text for c in chunks) == one.text and chunks[-1].finish_reason == "length"
    assert chat.token_ids == llama.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0).token_ids
    assert "".join(c.text for c in chat_chunks) == chat.text
    assert np.allclose(vectors, bert.embed(["hello", "world"]), atol=1e-6)
    assert ppl == pytest.approx(llama.perplexity("The cat walks to the river."))


def test_async_stream_stopped_early_releases_the_model(llama):
    async def main():
        stream = llama.astream(PROMPTS[0], max_tokens=50, temperature=0)
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert asyncio.run(main()).token_ids
    assert llama.status()["active_requests"] == 0


def test_async_errors_reach_the_caller(llama, bert):
    async def main():
        with pytest.raises(OptionsError):
            await llama.agenerate("Hi", max_tokens=0)
        with pytest.raises(UnsupportedError):
            [c async for c in bert.astream("hello", max_tokens=2)]

    asyncio.run(main())


# -- detokenizing ---------------------------------------------------------------------------------------


def test_incremental_detokenizing_never_splits_a_character(tiny_tokenizer):
    tokenizer = Tokenizer(tiny_tokenizer, source="tiny")
    text = " caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e \U0001f642 done"
    ids = tokenizer.encode(text, special=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens
    prompt = tokenizer.encode("Hello")
    detok = Detokenizer(tokenizer, prompt)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
