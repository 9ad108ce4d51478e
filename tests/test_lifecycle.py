"""The lifecycle manager with the fake backend and a fake clock: states and
events, single-flight loads, waiting for a loading model, rollback, the memory
budget and eviction, keep-alive, monitoring and alerts. The real-model
counterparts (a swap across backends under load, a corrupt file, memory
released) are in test_real_models.py."""

from __future__ import annotations

import threading

import pytest
from conftest import in_thread, wait_for

import llmk
from llmk.kernel import Kernel
from llmk.memory import Resident, choose_victims, parse_size
from llmk.monitor import RequestRecord
from llmk.testing import FakeBackend, load_fake


class Clock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Events:
    """Records the lifecycle hooks."""

    __name__ = "events"

    def __init__(self) -> None:
        self.states: list[tuple[str, int, str, dict]] = []
        self.alerts: list[tuple[str, int, dict]] = []
        self.requests: list[tuple[str, int, RequestRecord]] = []

    @llmk.hookimpl
    def model_state_changed(self, name, version, state, previous, detail):
        self.states.append((name, version, state, detail))

    @llmk.hookimpl
    def model_alert(self, name, version, alert):
        self.alerts.append((name, version, alert))

    @llmk.hookimpl
    def request_finished(self, name, version, record):
        self.requests.append((name, version, record))

    def of(self, name: str, version: int) -> list[str]:
        return [s for n, v, s, _ in self.states if (n, v) == (name, version)]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def events():
    return Events()


@pytest.fixture
def make(fake_plugin, events, clock, tmp_path):
    """A kernel with the fake backend, the event recorder and the fake clock."""
    kernels = []

    def build(**options) -> Kernel:
        kernel = Kernel(plugins=[fake_plugin, events], autoload=False, cache_dir=tmp_path / "cache", clock=clock,
                        reap_interval=0, drain_timeout=10.0, **options)
        kernels.append(kernel)
        return kernel

    yield build
    for kernel in kernels:
        kernel.close()


# -- states and events ------------------------------------------------------------------


def test_every_transition_is_an_event_and_visible_in_status(make, events):
    kernel = make()
    load_fake(kernel, "m")
    assert events.of("m", 1) == ["loading", "warming", "ready"]
    ready = events.states[-1][3]
    assert ready["mode"] == "new" and ready["memory_bytes"] == 1000 and ready["seconds"] >= 0

    # A slow new version: while it warms up, status shows both versions.
    swap, box = in_thread(kernel.swap, "m", options={"salt": 1, "delay": 0.05})
    wait_for(lambda: "warming" in events.of("m", 2))
    rows = {(r["version"], r["state"], r["current"]) for r in kernel.status()}
    assert {(1, "ready", True), (2, "warming", False)} <= rows
    swap.join(10)
    assert "error" not in box
    assert events.of("m", 1) == ["loading", "warming", "ready", "draining", "unloading", "unloaded"]
    assert events.of("m", 2) == ["loading", "warming", "ready"]
    draining = next(d for n, v, s, d in events.states if (n, v, s) == ("m", 1, "draining"))
    assert draining["reason"] == "swapped"
    (row,) = kernel.status()
    assert (row["version"], row["state"], row["memory_bytes"], row["memory_estimate_bytes"]) == (2, "ready", 1000, 1000)
    assert kernel.metrics()["swaps"] == {"ok": 1} and kernel.metrics()["swap_modes"] == {"alongside": 1}


def test_a_failed_load_is_visible_until_a_load_succeeds(make, events):
    kernel = make()
    with pytest.raises(llmk.ModelLoadError, match="fake load failure"):
        load_fake(kernel, "m", options={"fail_load": True})
    (row,) = kernel.status()
    assert row["state"] == "failed" and "fake load failure" in row["failure"] and not row["current"]
    assert events.of("m", 1) == ["loading", "failed"]
    with pytest.raises(llmk.ModelLoadError, match="fake load failure"):  # requests get the reason
        llmk.ModelHandle(kernel, "m").generate("Hello", max_tokens=1)
    load_fake(kernel, "m")
    assert [r["state"] for r in kernel.status()] == ["ready"]
    assert kernel.metrics()["loads"] == {"failed": 1, "ok": 1}


# -- single flight -------------------------------------------------------------------------


def test_concurrent_loads_of_one_spec_share_one_load(make):
    kernel = make()
    threads = [in_thread(load_fake, kernel, "m", options={"delay": 0.05}) for _ in range(4)]
    for thread, box in threads:
        thread.join(10)
        assert "error" not in box and isinstance(box["result"], llmk.ModelHandle)
    assert FakeBackend.loads == 1
    assert [r["version"] for r in kernel.status()] == [1]


def test_concurrent_loads_share_a_failure_too(make):
    kernel = make()
    threads = [in_thread(load_fake, kernel, "m", options={"fail_warmup": True, "delay": 0.05}) for _ in range(3)]
    for thread, box in threads:
        thread.join(10)
        assert isinstance(box.get("error"), llmk.ModelLoadError)
    assert FakeBackend.loads == 1


def test_a_different_spec_waits_for_the_load_in_flight(make):
    kernel = make()
    first, first_box = in_thread(load_fake, kernel, "m", options={"delay": 0.05})
    wait_for(lambda: kernel.status())
    second, second_box = in_thread(load_fake, kernel, "m", options={"salt": 2})
    first.join(10)
    second.join(10)
    assert "error" not in first_box and "error" not in second_box
    (row,) = kernel.status()
    assert row["version"] == 2  # loaded after the first, as a swap


def test_requests_wait_for_a_model_that_is_loading(make, events):
    kernel = make()
    loader, _ = in_thread(load_fake, kernel, "m", options={"delay": 0.05})
    wait_for(lambda: events.of("m", 1))
    handle = kernel.get("m")  # known while loading
    assert handle.generate("Hello", max_tokens=3, temperature=0).completion_tokens == 3
    loader.join(10)


def test_waiting_for_a_loading_model_times_out(make, events):
    kernel = make(wait_timeout=0.05)
    loader, _ = in_thread(load_fake, kernel, "m", options={"delay": 0.2})
    wait_for(lambda: events.of("m", 1))
    with pytest.raises(llmk.ModelNotReadyError, match="'m' is still loading after"):
        kernel.get("m").generate("Hello", max_tokens=1)
    loader.join(10)


# -- rollback ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"fail_load": True}, llmk.ModelLoadError, "fake load failure"),
        ({"fail_warmup": True}, llmk.ModelLoadError, "fake warm-up failure"),
        ({"nan": True}, llmk.HealthCheckError, "non-finite"),
    ],
)
def test_a_failed_swap_leaves_the_old_version_serving(make, events, options, error, message):
    kernel = make()
    handle = load_fake(kernel, "m")
    before = handle.generate("Hello", max_tokens=4, temperature=0).text
    with pytest.raises(error, match=message):
        kernel.swap("m", options=options)
    assert handle.status()["version"] == 1 and handle.status()["state"] == "ready"
    assert handle.generate("Hello", max_tokens=4, temperature=0).text == before
    assert events.of("m", 2)[-1] == "failed"
    failed = next(d for n, v, s, d in events.states if (n, v, s) == ("m", 2, "failed"))
    assert message in failed["error"]
    assert kernel.metrics()["swaps"] == {"rolled_back": 1}
    assert FakeBackend.closes == (0 if options.get("fail_load") else 1)  # the failed runner was freed


# -- memory budget and eviction -----------------------------------------------------------------


def test_parse_size():
    assert parse_size("8GiB") == 8 * 1024**3 and parse_size("512 MB") == 512 * 10**6 and parse_size(1000) == 1000
    assert parse_size(None) is None
    with pytest.raises(llmk.OptionsError, match="'lots' is not a size"):
        parse_size("lots")


def test_the_policy_picks_least_recently_used_idle_models_deterministically():
    residents = [Resident("b", 100, last_used=5), Resident("a", 100, last_used=5), Resident("c", 100, last_used=1),
                 Resident("pinned", 500, last_used=0, pinned=True), Resident("busy", 500, last_used=0, busy=True),
                 Resident("kept", 500, last_used=0, keep_alive_until=20)]
    assert choose_victims(50, 100, residents, now=10) == []
    assert [r.name for r in choose_victims(250, 100, residents, now=10)] == ["c", "a"]  # LRU, then by name
    assert choose_victims(500, 100, residents, now=10) is None  # not even all three idle ones: evict nothing
    assert [r.name for r in choose_victims(500, 100, residents, now=30)] == ["kept"]  # keep-alive over


def test_idle_models_are_evicted_least_recently_used_first(make, clock, events):
    kernel = make(memory_budget=3000)
    for name in ("a", "b", "c"):
        load_fake(kernel, name)
        clock.advance(1)
    kernel.get("a").generate("Hello", max_tokens=1)  # a is now the most recently used
    clock.advance(1)
    load_fake(kernel, "d")
    assert kernel.names() == ["a", "c", "d"]
    assert kernel.metrics()["evictions"] == {"memory": 1}
    assert kernel.metrics()["memory"] == {"budget_bytes": 3000, "used_bytes": 3000, "free_bytes": 0}
    draining = next(d for n, v, s, d in events.states if (n, s) == ("b", "draining"))
    assert draining["reason"] == "evicted:memory"


def test_pinned_busy_and_kept_alive_models_are_not_evicted(make, clock):
    kernel = make(memory_budget=4000)
    load_fake(kernel, "pinned", pinned=True)
    load_fake(kernel, "kept", keep_alive=60)
    busy = load_fake(kernel, "busy")
    load_fake(kernel, "idle")
    clock.advance(10)  # "kept" is still within its keep-alive
    stream = busy.stream("Hello", max_tokens=50)  # holds its lease until closed
    load_fake(kernel, "new")
    assert kernel.names() == ["busy", "kept", "new", "pinned"]
    assert kernel.metrics()["evictions"] == {"memory": 1}
    stream.close()


def test_a_load_that_cannot_fit_is_refused_and_evicts_nothing(make, clock):
    kernel = make(memory_budget=2500)
    load_fake(kernel, "pinned", pinned=True)
    busy = load_fake(kernel, "busy")
    stream = busy.stream("Hello", max_tokens=50)
    with pytest.raises(llmk.MemoryBudgetError, match=r"'big' needs about 2\.0 KiB .* budget is 2\.4 KiB"):
        load_fake(kernel, "big", options={"memory": 2000})
    stream.close()
    assert kernel.names() == ["busy", "pinned"]
    assert kernel.metrics()["evictions"] == {}
    assert [r["state"] for r in kernel.status() if r["name"] == "big"] == ["failed"]


def test_a_swap_that_does_not_fit_alongside_drains_and_replaces(make, events):
    kernel = make(memory_budget=1500)
    handle = load_fake(kernel, "m")
    kernel.swap("m", options={"salt": 1})
    assert handle.status()["version"] == 2
    assert kernel.metrics()["swap_modes"] == {"replace": 1}
    ready = next(d for n, v, s, d in events.states if (n, v, s) == ("m", 2, "ready"))
    assert ready["mode"] == "replace"
    # The old version was freed before the new one loaded.
    order = [(v, s) for n, v, s, _ in events.states if n == "m"]
    assert order.index((1, "unloaded")) < order.index((2, "warming"))


def test_a_failed_replace_brings_the_old_spec_back(make):
    kernel = make(memory_budget=1500)
    handle = load_fake(kernel, "m")
    before = handle.generate("Hello", max_tokens=4, temperature=0).text
    with pytest.raises(llmk.ModelLoadError, match="fake load failure"):
        kernel.swap("m", options={"fail_load": True})
    status = handle.status()
    assert status["state"] == "ready" and status["version"] == 3  # v1 replaced, v2 failed, v3 = v1's spec again
    assert handle.generate("Hello", max_tokens=4, temperature=0).text == before
    assert kernel.metrics()["swaps"] == {"rolled_back": 1}


def test_keep_alive_expires_idle_models(make, clock, events):
    kernel = make()
    handle = load_fake(kernel, "m", keep_alive=30)
    load_fake(kernel, "forever")
    clock.advance(20)
    handle.generate("Hello", max_tokens=1)  # resets the keep-alive
    clock.advance(20)
    assert kernel.reap() == []
    clock.advance(15)
    assert kernel.reap() == ["m"]
    assert kernel.names() == ["forever"]
    assert kernel.metrics()["evictions"] == {"expired": 1}


# -- monitoring ------------------------------------------------------------------------------


def test_counters_are_exact_under_concurrent_requests(make):
    kernel = make()
    handle = load_fake(kernel, "m")

    def client():
        for _ in range(25):
            handle.generate("Hello", max_tokens=2, temperature=0)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    status = handle.status()
    assert status["requests"] == 200 and status["tokens_out"] == 400 and status["errors"] == 0
    assert status["window"] == 200
    assert 0 <= status["queue_wait_p50_seconds"] <= status["queue_wait_p95_seconds"]
    assert 0 < status["ttft_p50_seconds"] <= status["ttft_p95_seconds"]


def test_every_finished_request_reaches_the_request_finished_hook(make, events):
    kernel = make()
    handle = load_fake(kernel, "m", options={"eos_at": 3})
    handle.generate("Hello", max_tokens=8, temperature=0)
    stream = handle.stream("Hello", max_tokens=8, temperature=0)
    next(stream)
    stream.close()  # the reader went away
    with pytest.raises(llmk.OptionsError):
        handle.chat([], max_tokens=2)
    handle.generate("Hello", max_tokens=2, timeout=0.0)
    done, cancelled, rejected, timed_out = [r for n, v, r in events.requests if (n, v) == ("m", 1)][-4:]
    assert (done.finish_reason, done.tokens_out, done.error) == ("stop", 3, False)
    assert done.tokens_in > 0 and done.ttft is not None and done.tpot is not None and done.queue_wait >= 0
    assert (cancelled.finish_reason, cancelled.tokens_out) == ("cancelled", 1)
    assert rejected.rejected and not rejected.error
    assert timed_out.finish_reason == "timeout" and timed_out.tokens_out == 0
    assert handle.status()["requests"] == len([r for n, v, r in events.requests if n == "m"])


def test_an_alert_fires_once_when_a_threshold_is_crossed(make, events):
    kernel = make(alerts=[llmk.AlertRule("ttft_p95_seconds", 0.01, min_requests=3)])
    slow = load_fake(kernel, "slow", options={"delay": 0.02})
    fast = load_fake(kernel, "fast")
    for _ in range(2):
        slow.generate("Hello", max_tokens=1)
    assert events.alerts == []  # not enough requests for a trend yet
    for _ in range(3):
        slow.generate("Hello", max_tokens=1)
        fast.generate("Hello", max_tokens=1)
    ((name, version, alert),) = events.alerts
    assert (name, version, alert["metric"], alert["state"], alert["threshold"]) == (
        "slow", 1, "ttft_p95_seconds", "firing", 0.01)
    assert alert["value"] > 0.01
