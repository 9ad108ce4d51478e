"""CUDA paths of the torch and ONNX Runtime backends.

Skipped, with the reason, on machines without a CUDA device (CI has none); run
them where one is available: `pytest -m gpu`.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import llmk

pytestmark = pytest.mark.gpu


def _cuda_reason() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA device on this machine (CI runs on CPU only)"


def _ort_cuda_reason() -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install llmk[gpu]: onnxruntime-gpu)"
    return _cuda_reason()


needs_cuda = pytest.mark.skipif(bool(_cuda_reason()), reason=_cuda_reason() or "")
needs_ort_cuda = pytest.mark.skipif(bool(_ort_cuda_reason()), reason=_ort_cuda_reason() or "")
PROMPTS = ["The capital of France is", "Once upon a time there was a little fox who lived", "Hi"]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with llmk.Kernel(cache_dir=tmp_path_factory.mktemp("gpu-cache"), autoload=False) as kernel:
        yield kernel


@needs_cuda
def test_torch_cuda_matches_cpu(kernel, tiny_llama, tiny_bert):
    cpu = kernel.load("cpu", source=str(tiny_llama), backend="torch", device="cpu")
    gpu = kernel.load("gpu", source=str(tiny_llama), backend="torch", device="cuda", dtype="fp32")
    assert gpu.status()["device"].startswith("cuda")
    expected = [r.token_ids for r in cpu.generate(PROMPTS, max_tokens=16, temperature=0)]
    assert [r.token_ids for r in gpu.generate(PROMPTS, max_tokens=16, temperature=0)] == expected
    e_cpu = np.array(kernel.load("e-cpu", source=str(tiny_bert), backend="torch", device="cpu").embed(PROMPTS))
    e_gpu = np.array(kernel.load("e-gpu", source=str(tiny_bert), backend="torch", device="cuda").embed(PROMPTS))
    assert (e_cpu * e_gpu).sum(axis=1).min() > 0.9999


@needs_cuda
def test_auto_prefers_cuda(kernel, tiny_llama):
    model = kernel.load("auto", source=str(tiny_llama))
    assert model.status()["device"].startswith("cuda")


def adapters_on(kernel, tiny_llama, tmp_path, device: str) -> None:
    """LoRA tuned on ``device``, served on it per request: one batch with two adapters and
    none gives each answer as alone, alone (merged) as on the CPU's per-row path."""
    data = tmp_path / "notes.txt"
    data.write_text(" ".join(f"note {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    options = {"max_length": 32, "epochs": 2, "learning_rate": 0.01, "seed": 1}
    first = kernel.tune(str(tiny_llama), data, device=device, **options)
    assert first.perplexity_after < first.perplexity_before
    data.write_text(" ".join(f"entry {i}: a slow green turtle walks under the busy bridge." for i in range(60)))
    second = kernel.tune(str(tiny_llama), data, device=device, **options)
    adapters = {"fox": str(first.adapter), "turtle": str(second.adapter)}
    served = kernel.load(f"adapted-{device}", source=str(tiny_llama), backend="torch", device=device,
                         dtype="fp32", adapters=adapters)
    cpu = kernel.load("adapted-cpu-reference", source=str(tiny_llama), backend="torch", device="cpu",
                      adapters=adapters)
    names = [None, "fox", "turtle"]
    alone = {n: served.generate(PROMPTS[1], max_tokens=12, temperature=0, adapter=n).token_ids for n in names}
    assert len({tuple(t) for t in alone.values()}) == 3  # each adapter changes the answer
    assert alone == {n: cpu.generate(PROMPTS[1], max_tokens=12, temperature=0, adapter=n).token_ids for n in names}
    engine = served.version.engine
    with engine.lock:  # the three queue while the engine is held, then share its steps
        requests = {n: engine.submit(engine.prompt_ids(PROMPTS[1]), llmk.SamplingParams(max_tokens=12, temperature=0),
                                     adapter=n) for n in names}
    together = {n: [t for chunk in request for t in chunk.token_ids] for n, request in requests.items()}
    assert together == alone
    assert max(rows for rows, _ in engine.scheduler.recent_steps) == 3


@needs_cuda
def test_adapters_tune_and_serve_on_cuda(kernel, tiny_llama, tmp_path):
    adapters_on(kernel, tiny_llama, tmp_path, "cuda")


@needs_ort_cuda
def test_onnxruntime_cuda_keeps_the_cache_on_the_device(kernel, tiny_llama):
    # GroupQueryAttention has no fp32 CUDA kernel: the CUDA graph is fp16, compared by score.
    cpu = kernel.load("ort-cpu", source=str(tiny_llama), backend="onnxruntime", device="cpu")
    gpu = kernel.load("ort-gpu", source=str(tiny_llama), backend="onnxruntime", device="cuda", dtype="fp16")
    text = " ".join(PROMPTS)
    assert gpu.perplexity(text) == pytest.approx(cpu.perplexity(text), rel=2e-2)
    results = gpu.generate(PROMPTS, max_tokens=16, temperature=0)
    assert all(r.completion_tokens == 16 for r in results)
    # Staggered requests share steps and the prefix cache on the device, each as it would alone.
    alone = [gpu.generate(p, max_tokens=16, temperature=0).token_ids for p in PROMPTS]
    assert [r.token_ids for r in results] == alone
    assert gpu.version.engine.runner.cache_device.startswith("cuda")
