"""The kernel's lifecycle — load, get, status, hot-swap, drain, unload — on the fake backend."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import ClassVar

import pytest
from conftest import in_thread, wait_for
from pydantic import Field

import llmk
from llmk.errors import (
    BackendUnavailableError,
    ModelLoadError,
    ModelNotFoundError,
    OptionsError,
    UnknownNameError,
    UnsupportedError,
)
from llmk.testing import FakeBackend, FakePlugin, load_fake


def chain(runner, prompt_ids, n):
    """The tokens ``runner`` generates greedily after ``prompt_ids``."""
    return runner.expected(prompt_ids, n)


# -- load, get, status, unload ------------------------------------------------------------


def test_load_get_and_status(kernel):
    started = time.time()
    handle = load_fake(kernel, "chat")
    assert isinstance(handle, llmk.ModelHandle) and handle.name == "chat"
    assert kernel.get("chat").name == "chat" and kernel.names() == ["chat"]
    (status,) = kernel.status()
    assert status == handle.status()
    assert {k: status[k] for k in ("name", "version", "state", "source", "backend", "device", "dtype", "passes")} == {
        "name": "chat", "version": 1, "state": "ready", "source": "fake:chat", "backend": "fake", "device": "cpu",
        "dtype": "fp32", "passes": [],
    }
    assert status["memory_bytes"] > 0 and status["load_seconds"] >= 0
    assert started <= status["loaded_at"] <= time.time()
    assert (status["active_requests"], status["requests"], status["errors"]) == (0, 0, 0)  # warm-up is not counted
    assert FakeBackend.loads == 1 and FakeBackend.runners[0].calls >= 2


def test_requests_update_the_counters(kernel):
    handle = load_fake(kernel)
    before = handle.status()
    result = handle.generate("Hello", max_tokens=5, temperature=0)
    list(handle.stream("Hello", max_tokens=3, temperature=0))
    with pytest.raises(OptionsError):
        handle.generate("Hello " * 2000, max_tokens=1)
    after = handle.status()
    assert after["requests"] == before["requests"] + 3
    assert after["tokens_out"] == before["tokens_out"] + 8
    assert after["tokens_in"] == before["tokens_in"] + 2 * result.prompt_tokens
    # An invalid request is the caller's mistake: rejected, not a model error.
    assert after["rejected"] == before["rejected"] + 1 and after["errors"] == before["errors"]
    assert after["ttft_p50_seconds"] > 0 and after["tpot_p50_seconds"] > 0
    assert after["last_used"] >= before["last_used"]


def test_the_greedy_output_is_the_backend_s(kernel):
    handle = load_fake(kernel)
    runner = handle.version.engine.runner
    ids = handle.version.engine.prompt_ids("Hello there")
    assert handle.generate("Hello there", max_tokens=7, temperature=0).token_ids == chain(runner, ids, 7)


def test_unload_frees_the_model(kernel):
    handle = load_fake(kernel, "a")
    load_fake(kernel, "b")
    runner = handle.version.engine.runner
    kernel.unload("a")
    assert runner.closed and FakeBackend.closes == 1
    assert kernel.names() == ["b"]
    with pytest.raises(ModelNotFoundError):
        handle.generate("Hello", max_tokens=2)
    with pytest.raises(ModelNotFoundError) as info:
        kernel.unload("a")
    assert info.value.known == ["b"]


def test_an_unknown_model_name_lists_the_loaded_ones(kernel):
    load_fake(kernel, "chat")
    load_fake(kernel, "embed", source="fake-embed:e")
    for call in (kernel.get, kernel.unload, lambda n: kernel.swap(n, options={"salt": 1})):
        with pytest.raises(ModelNotFoundError) as info:
            call("chta")
        assert info.value.known == ["chat", "embed"]
        assert "'chta'" in str(info.value) and "chat, embed" in str(info.value)
    assert isinstance(info.value, UnknownNameError)


def test_loading_the_same_spec_twice_does_not_reload(kernel):
    first = load_fake(kernel, "m", options={"delay": 0})
    runner = first.version.engine.runner
    second = load_fake(kernel, "m", options={"delay": 0})
    assert FakeBackend.loads == 1 and second.version.number == 1
    assert second.version.engine.runner is runner and not runner.closed


def test_loading_a_different_spec_under_a_name_hot_swaps(kernel):
    load_fake(kernel, "m")
    old = kernel.get("m").version.engine.runner
    handle = load_fake(kernel, "m", options={"salt": 3})
    assert FakeBackend.loads == 2 and handle.version.number == 2 and old.closed
    assert kernel.names() == ["m"]


def test_kernel_close_unloads_everything(fake_plugin, tmp_path):
    with llmk.Kernel(plugins=[fake_plugin], autoload=False, cache_dir=tmp_path) as kernel:
        load_fake(kernel, "a")
        load_fake(kernel, "b")
    assert kernel.names() == [] and FakeBackend.closes == 2
    assert all(r.closed for r in FakeBackend.runners)


# -- hot-swap ------------------------------------------------------------------------------------


def test_the_handle_follows_the_name_after_a_swap(kernel):
    handle = load_fake(kernel, "m")
    old = handle.version.engine.runner
    swapped = kernel.swap("m", options={"salt": 1})
    new = handle.version.engine.runner
    assert new is not old and old.closed and not new.closed
    assert handle.version.number == swapped.version.number == 2
    ids = handle.version.engine.prompt_ids("Hello")
    assert handle.generate("Hello", max_tokens=4, temperature=0).token_ids == chain(new, ids, 4) != chain(old, ids, 4)
    # Fields not given keep their values.
    spec = handle.version.spec
    assert (spec.source, spec.backend, spec.options) == ("fake:m", "fake", {"salt": 1})


def test_a_stream_started_before_a_swap_finishes_on_the_old_version(kernel):
    handle = load_fake(kernel, "m")
    old = handle.version.engine.runner
    ids = handle.version.engine.prompt_ids("Hello")
    stream = handle.stream("Hello", max_tokens=6, temperature=0)
    chunks = [next(stream)]
    swap, box = in_thread(kernel.swap, "m", options={"salt": 1})
    wait_for(lambda: handle.version.number == 2)
    new = handle.version.engine.runner
    # The new version serves new calls while the old one drains.
    assert handle.generate("Hello", max_tokens=3, temperature=0).token_ids == chain(new, ids, 3)
    time.sleep(0.05)
    assert swap.is_alive() and not old.closed
    chunks += list(stream)
    swap.join(5)
    assert not swap.is_alive() and "error" not in box
    assert [t for c in chunks for t in c.token_ids] == chain(old, ids, 6)
    assert chunks[-1].finish_reason == "length"
    assert old.closed and not new.closed


def test_concurrent_requests_share_a_version(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.002})
    engine = handle.version.engine
    runner = engine.runner
    warm_up, reused = len(runner.steps), engine.cache_stats()["prefix_cache_reused_tokens"]
    prompts = ["Hello", "The cat walks to", "Once upon a time", "Hi"]
    threads = [in_thread(handle.generate, p, max_tokens=12, temperature=0) for p in prompts]
    for prompt, (thread, box) in zip(prompts, threads):
        thread.join(10)
        assert "error" not in box
        assert box["result"].token_ids == chain(runner, handle.version.engine.prompt_ids(prompt), 12)
    assert handle.status()["active_requests"] == 0
    # Each position was computed once: the prompts (less what the prefix cache held) and 11
    # decode steps each (the scheduler batches them; tests/test_scheduler.py covers the policy).
    computed = sum(count for step in runner.steps[warm_up:] for _, _, count, _ in step)
    reused = engine.cache_stats()["prefix_cache_reused_tokens"] - reused
    assert computed == sum(len(engine.prompt_ids(p)) for p in prompts) - reused + 11 * len(prompts)


def test_a_request_that_looked_up_the_model_just_before_a_swap_is_not_lost(kernel, monkeypatch):
    # Pause one request between finding the current version and leasing it, and
    # hot-swap in that window: the request must still be served (by either
    # version), never by a version that was closed under it.
    from llmk.lifecycle import ModelVersion

    handle = load_fake(kernel, "m")
    paused, go = threading.Event(), threading.Event()
    lease = ModelVersion.lease

    def slow_lease(self, now):
        if threading.current_thread().name == "request" and not paused.is_set():
            paused.set()
            go.wait(5)
        lease(self, now)

    monkeypatch.setattr(ModelVersion, "lease", slow_lease)
    request, box = in_thread(handle.generate, "Hello", max_tokens=4, temperature=0, thread_name="request")
    assert paused.wait(5)
    swap, swap_box = in_thread(kernel.swap, "m", options={"salt": 1})
    swap.join(0.5)  # a kernel that leases under its lock makes the swap wait here instead
    go.set()
    request.join(5)
    swap.join(5)
    assert "error" not in swap_box
    assert "error" not in box, f"the request was lost: {box.get('error')!r}"
    assert len(box["result"].token_ids) == 4


def test_a_request_running_during_a_swap_finishes_on_the_old_version(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.02})
    old = handle.version.engine.runner
    ids = handle.version.engine.prompt_ids("Hello")
    request, box = in_thread(handle.generate, "Hello", max_tokens=10, temperature=0)
    wait_for(lambda: handle.status()["active_requests"] == 1)
    kernel.swap("m", options={"salt": 1})  # returns once the old version has drained
    assert old.closed
    request.join(5)
    # The fake runner raises if used after close(): a complete result proves the wait.
    assert "error" not in box and box["result"].token_ids == chain(old, ids, 10)


@pytest.mark.parametrize("knob", ["fail_load", "fail_warmup"])
def test_a_failing_swap_keeps_the_old_version_serving(kernel, knob):
    handle = load_fake(kernel, "m")
    old = handle.version.engine.runner
    before = kernel.status()
    with pytest.raises(ModelLoadError) as info:
        kernel.swap("m", options={knob: True})
    assert info.value.model == "m" and knob in str(info.value)
    assert kernel.status() == before
    assert handle.version.number == 1 and handle.version.engine.runner is old and not old.closed
    assert handle.generate("Hello", max_tokens=2, temperature=0).finish_reason == "length"
    if knob == "fail_warmup":  # the runner that failed was released
        assert FakeBackend.runners[-1] is not old and FakeBackend.runners[-1].closed


def test_a_failing_first_load_leaves_nothing_behind(kernel):
    with pytest.raises(ModelLoadError):
        load_fake(kernel, "m", options={"fail_warmup": True})
    assert kernel.names() == [] and FakeBackend.runners[0].closed
    with pytest.raises(ModelNotFoundError):
        kernel.get("m")


def test_bad_backend_options_name_the_backend_and_key(kernel):
    with pytest.raises(OptionsError) as info:
        load_fake(kernel, "m", options={"dalay": 1})
    assert "backend 'fake'" in str(info.value) and "dalay" in str(info.value)
    with pytest.raises(OptionsError, match="delay"):
        load_fake(kernel, "m", options={"delay": -1})
    assert FakeBackend.loads == 0 and kernel.names() == []


# -- drain on unload ------------------------------------------------------------------------------------


def test_unload_waits_for_running_streams(kernel):
    handle = load_fake(kernel, "m")
    runner = handle.version.engine.runner
    stream = handle.stream("Hello", max_tokens=5, temperature=0)
    first = next(stream)
    unload, box = in_thread(kernel.unload, "m")
    wait_for(lambda: kernel.names() == [])
    with pytest.raises(ModelNotFoundError):  # new requests are refused at once
        handle.generate("Hello", max_tokens=1)
    time.sleep(0.05)
    assert unload.is_alive() and not runner.closed
    rest = list(stream)
    unload.join(5)
    assert not unload.is_alive() and "error" not in box and runner.closed
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 5


def test_a_stream_that_is_never_iterated_releases_its_lease_when_closed(kernel):
    # A client that disconnects before the first chunk must not pin the version
    # forever (unload and swap would then wait for the whole drain timeout).
    handle = load_fake(kernel, "m")
    stream = handle.stream("Hello", max_tokens=5, temperature=0)
    try:
        stream.close()
        assert handle.status()["active_requests"] == 0
    finally:
        kernel.unload("m", timeout=0.1)


def test_a_stream_closed_early_releases_its_lease(kernel):
    handle = load_fake(kernel, "m")
    stream = handle.stream("Hello", max_tokens=50, temperature=0)
    next(stream)
    stream.close()
    assert handle.status()["active_requests"] == 0
    started = time.monotonic()
    kernel.unload("m")
    assert time.monotonic() - started < 1


# -- backend choice ------------------------------------------------------------------------------------


def backend(name: str, rank: dict[str, int], **attributes) -> type[FakeBackend]:
    return type(f"Backend_{name}", (FakeBackend,), {"name": name, "speed_rank": rank, **attributes})


def kernel_with(tmp_path, tiny_tokenizer, *classes) -> llmk.Kernel:
    FakeBackend.reset()
    return llmk.Kernel(plugins=[FakePlugin(tiny_tokenizer, backends=classes)], autoload=False, cache_dir=tmp_path)


def test_auto_picks_the_fastest_available_backend(tmp_path, tiny_tokenizer):
    with kernel_with(
        tmp_path, tiny_tokenizer,
        backend("slow", {"cpu": 20}),
        backend("fast", {"cpu": 50}),
        backend("fastest-missing", {"cpu": 500}, requires=("llmk_no_such_module",)),
        backend("fastest-embed-only", {"cpu": 1000}, tasks=frozenset({"embed"})),
        backend("gpu-only", {"cuda": 2000}),
    ) as kernel:
        assert kernel.load("chat", "fake:chat").status()["backend"] == "fast"
        assert kernel.load("embed", "fake-embed:e").status()["backend"] == "fastest-embed-only"
        assert kernel.load("explicit", "fake:chat", backend="slow").status()["backend"] == "slow"


def test_auto_breaks_ties_by_name(tmp_path, tiny_tokenizer):
    with kernel_with(tmp_path, tiny_tokenizer, backend("zeta", {"cpu": 50}), backend("alpha", {"cpu": 50})) as kernel:
        assert kernel.load("m", "fake:m").status()["backend"] == "alpha"


def test_auto_with_no_backend_for_the_device(tmp_path, tiny_tokenizer):
    kernel = kernel_with(tmp_path, tiny_tokenizer, backend("cpu-only", {"cpu": 50}))
    with pytest.raises(BackendUnavailableError, match="cuda"):
        kernel.load("m", "fake:m", device="cuda")


def test_a_backend_missing_its_runtime_gives_the_install_line(tmp_path, tiny_tokenizer):
    missing = backend("missing", {"cpu": 5}, requires=("llmk_no_such_module",),
                      install="pip install llmk-backend-missing")
    kernel = kernel_with(tmp_path, tiny_tokenizer, missing)
    with pytest.raises(BackendUnavailableError) as info:
        kernel.load("m", "fake:m", backend="missing")
    assert info.value.install == "pip install llmk-backend-missing"
    assert "install it with: pip install llmk-backend-missing" in str(info.value)
    assert "llmk_no_such_module" in str(info.value)
    assert FakeBackend.loads == 0


def test_a_backend_that_cannot_serve_the_task(tmp_path, tiny_tokenizer):
    kernel = kernel_with(tmp_path, tiny_tokenizer, backend("embedder", {"cpu": 5}, tasks=frozenset({"embed"})))
    with pytest.raises(UnsupportedError, match="embedder"):
        kernel.load("m", "fake:m", backend="embedder")


def test_a_device_the_backend_does_not_run_on(kernel):
    with pytest.raises(UnsupportedError, match="cuda"):
        load_fake(kernel, "m", device="cuda")
    assert load_fake(kernel, "m", device="cpu").status()["device"] == "cpu"


def test_the_fake_plugin_builds_its_tokenizer_into_the_cache(tmp_path):
    FakeBackend.reset()
    with llmk.Kernel(plugins=[FakePlugin()], autoload=False, cache_dir=tmp_path) as kernel:
        handle = kernel.load("m", "fake:m", backend="fake")
        assert handle.version.artifact.tokenizer_dir == tmp_path / "sources" / "llmk-fake-tokenizer"
        assert handle.generate("Hello", max_tokens=3, temperature=0).finish_reason == "length"


# -- the cache: exports and passes ------------------------------------------------------------------------


class CountingPass(llmk.Optimizer):
    name = "count"
    backends = frozenset({"fake"})
    presets: ClassVar[dict] = {"high": {"level": 3}}
    applied: ClassVar[list] = []

    class Options(llmk.PassOptions):
        level: int = Field(1, ge=1, le=3)

    def apply(self, artifact, out_dir, *, backend, options):
        CountingPass.applied.append(options.level)
        (out_dir / "fake-model.json").write_bytes((artifact.path / "fake-model.json").read_bytes())


class PassPlugin:
    __name__ = "count-pass"

    def __init__(self, *passes):
        self.passes = passes or (CountingPass,)

    @llmk.hookimpl
    def register_passes(self, register):
        for cls in self.passes:
            register.add(cls)


@pytest.fixture
def pass_kernel(fake_plugin, tmp_path):
    CountingPass.applied = []
    kernel = llmk.Kernel(plugins=[fake_plugin, PassPlugin()], autoload=False, cache_dir=tmp_path / "cache")
    yield kernel
    kernel.close()


def test_exports_and_passes_are_built_once_and_cached(pass_kernel, fake_plugin, tmp_path):
    handle = load_fake(pass_kernel, "m", passes=["count:level=2"])
    artifact = handle.version.artifact
    assert artifact.path.parent.name == "passes" and artifact.format == "fake"
    assert (FakeBackend.exports, CountingPass.applied) == (1, [2])
    assert handle.status()["passes"] == ["count:level=2"]
    # A second kernel on the same cache reuses both entries.
    other = llmk.Kernel(plugins=[fake_plugin, PassPlugin()], autoload=False, cache_dir=tmp_path / "cache")
    assert load_fake(other, "m", passes=["count:level=2"]).version.artifact.path == artifact.path
    assert (FakeBackend.exports, CountingPass.applied) == (1, [2])
    # Different options are a different entry.
    load_fake(other, "m", passes=["count:preset=high"])
    assert CountingPass.applied == [2, 3]
    other.close()


def test_a_damaged_cache_entry_is_rebuilt(pass_kernel, fake_plugin, tmp_path):
    path = load_fake(pass_kernel, "m").version.artifact.path
    (path / "fake-model.json").write_text("{}" * 100)  # no longer matches the manifest
    other = llmk.Kernel(plugins=[fake_plugin], autoload=False, cache_dir=tmp_path / "cache")
    assert load_fake(other, "m").version.artifact.path == path
    assert FakeBackend.exports == 2
    other.close()


def test_bad_pass_options_name_the_pass(pass_kernel):
    with pytest.raises(OptionsError) as info:
        load_fake(pass_kernel, "m", passes=["count:levle=2"])
    assert "pass 'count'" in str(info.value) and "levle" in str(info.value)
    with pytest.raises(OptionsError, match="level"):
        load_fake(pass_kernel, "m", passes=["count:level=9"])
    with pytest.raises(UnknownNameError, match="high"):
        load_fake(pass_kernel, "m", passes=["count:preset=highest"])
    assert CountingPass.applied == [] and pass_kernel.names() == []


def test_a_pass_for_another_backend_or_missing_its_runtime(fake_plugin, tmp_path):
    other_backend = type("OtherPass", (CountingPass,), {"name": "other", "backends": frozenset({"torch"})})
    missing = type("MissingPass", (CountingPass,), {"name": "missing", "requires": ("llmk_no_such_module",),
                                                    "install": "pip install llmk-pass-missing"})
    kernel = llmk.Kernel(plugins=[fake_plugin, PassPlugin(other_backend, missing)], autoload=False,
                         cache_dir=tmp_path)
    with pytest.raises(UnsupportedError, match="supports: torch"):
        load_fake(kernel, "m", passes=["other"])
    with pytest.raises(UnsupportedError, match="pip install llmk-pass-missing"):
        load_fake(kernel, "m", passes=["missing"])


# -- async lifecycle -------------------------------------------------------------------------------------


def test_async_load_swap_unload(kernel):
    async def main():
        handle = await kernel.aload("m", "fake:m", backend="fake")
        await kernel.aswap("m", options={"salt": 2})
        number = handle.version.number
        await kernel.aunload("m")
        return number

    assert asyncio.run(main()) == 2
    assert kernel.names() == [] and FakeBackend.closes == 2
