"""Shared test setup: llmk's own test helpers, the same ones plugin authors use."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest_plugins = ["llmk.testing"]


@pytest.fixture
def install_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Install a throwaway distribution on ``sys.path`` for this test only.

    ``install_dist(code, ep_name="thirdparty", dist="llmk-thirdparty")`` writes a
    module holding ``code`` and a ``.dist-info`` whose ``llmk`` entry point names
    it, exactly what ``pip install`` of a plugin package leaves behind. Returns
    the module name (unique per call, so that ``sys.modules`` never serves a
    module from another test).
    """
    site = tmp_path / "site-packages"
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def install(code: str, *, ep_name: str = "thirdparty", dist: str = "llmk-thirdparty",
                version: str = "1.2.3") -> str:
        module = f"llmk_test_plugin_{uuid.uuid4().hex[:10]}"
        (site / f"{module}.py").write_text(code)
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[llmk]\n{ep_name} = {module}\n")
        modules.append(module)
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's environment must not change which plugins a test sees."""
    for variable in ("LLMK_DISABLE_PLUGINS", "LLMK_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(variable, raising=False)


def shared_cache_dir() -> str:
    """Where the real models' conversions and exports live across test runs (and CI
    runs on the same machine): ``LLMK_TEST_CACHE_DIR``, else llmk's default cache."""
    import os

    return os.environ.get("LLMK_TEST_CACHE_DIR") or str(Path("~/.cache/llmk").expanduser())


@pytest.fixture(scope="module")
def real_kernel():
    """A kernel on the shared cache, with llmk's built-in plugins only."""
    import llmk

    with llmk.Kernel(cache_dir=shared_cache_dir(), autoload=False) as kernel:
        yield kernel


def in_thread(function: Callable[..., object], *args: object, thread_name: str | None = None,
              **kwargs: object) -> tuple[threading.Thread, dict]:
    """Run ``function`` in a daemon thread; its result or error lands in the returned box."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - handed to the test
            box["error"] = error

    thread = threading.Thread(target=target, name=thread_name, daemon=True)
    thread.start()
    return thread, box


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class ServeProcess:
    """A real ``llmk serve`` process. Its output (stdout and the structured logs
    on stderr) is read all along into ``lines``, so the daemon never blocks on a
    full pipe and tests can look for events."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, ready_timeout: float = 300,
                 wait_ready: bool = True):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmk.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._eof = False
        self._new_line = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        match = self.wait_for_line(r"listening on (http://\S+)", timeout=ready_timeout)
        self.url = match.group(1)
        if wait_ready:
            self.wait_ready(ready_timeout)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
        with self._new_line:
            self._eof = True
            self._new_line.notify_all()

    @property
    def output(self) -> str:
        with self._new_line:
            return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 60, start: int = 0) -> re.Match:
        """The first line from index ``start`` on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines[start:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                start = len(self.lines)
                assert not self._eof, f"llmk serve exited ({self.process.poll()}):\n{''.join(self.lines)}"
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line matched {pattern!r}:\n{''.join(self.lines[-40:])}"
                self._new_line.wait(min(remaining, 0.5))

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/ready").status_code != 200:
            assert time.monotonic() < deadline and self.process.poll() is None, (
                f"the models did not load:\n{self.output[-4000:]}")
            time.sleep(0.2)

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(60)


@pytest.fixture(scope="session")
def tied_llama(tiny_llama, tmp_path_factory):
    """The tiny llama with its output head tied to the embedding table, as in SmolLM2."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path_factory.mktemp("tied") / "model"
    shutil.copytree(tiny_llama, directory)
    state = load_file(str(directory / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return directory


@pytest.fixture(scope="session")
def q4_grid_llama(tiny_llama, tmp_path_factory):
    """The tiny llama with its weights snapped to GGUF grids like SmolLM2's built-in
    ones: projections to Q4_1 (groups of 32, float scale and minimum), the
    embedding table to Q8_0 (groups of 32, symmetric int8)."""
    import torch
    from safetensors.torch import load_file, save_file

    directory = tmp_path_factory.mktemp("q4-grid") / "model"
    shutil.copytree(tiny_llama, directory)
    state = load_file(str(directory / "model.safetensors"))
    for name, weight in state.items():
        if name.endswith("proj.weight"):
            groups = weight.reshape(weight.shape[0], -1, 32)
            # GGUF stores each group's scale and minimum in fp16.
            low, high = groups.amin(-1, keepdim=True).half().float(), groups.amax(-1, keepdim=True)
            scale = ((high - low) / 15).half().float()
            state[name] = (torch.round((groups - low) / scale) * scale + low).reshape(weight.shape)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            groups = weight.reshape(weight.shape[0], -1, 32)
            scale = (groups.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-4).half().float()
            state[name] = (torch.round(groups / scale) * scale).reshape(weight.shape)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="session")
def fake_site(tmp_path_factory) -> Path:
    """A site directory holding a plugin package that registers llmk's fake backend."""
    site = tmp_path_factory.mktemp("fake-site")
    (site / "llmk_daemon_fake.py").write_text("from llmk.testing import FakePlugin\nplugin = FakePlugin()\n")
    info = site / "llmk_daemon_fake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llmk-daemon-fake\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[llmk]\nfake = llmk_daemon_fake:plugin\n")
    return site
