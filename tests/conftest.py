"""Shared test setup: llmk's own test helpers, the same ones plugin authors use."""

from __future__ import annotations

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
