"""What a careless or hostile caller must not be able to do: stall a model
silently (the watchdog), pile up unbounded prompt work (the admission budget),
send text that is not Unicode, or slip a duplicate key into a config file."""

from __future__ import annotations

import threading

import pytest
from conftest import in_thread, wait_for

import llmk
from llmk.config import ConfigError, load_config
from llmk.errors import OptionsError
from llmk.scheduler import EngineStalledError, QueueFullError
from llmk.testing import load_fake


class Alerts:
    def __init__(self):
        self.seen = []

    @llmk.hookimpl
    def model_alert(self, name, version, alert):
        self.seen.append((name, alert["metric"], alert["state"]))


@pytest.fixture
def gated(fake_plugin, tmp_path):
    """A kernel whose fake model's steps wait on a gate the test opens."""
    alerts = Alerts()
    kernel = llmk.Kernel(plugins=[fake_plugin, alerts], autoload=False, cache_dir=tmp_path / "cache",
                         reap_interval=0, stall_timeout=None, drain_timeout=5)
    handle = load_fake(kernel, "m", max_queued_prompt_tokens=60)
    gate = threading.Event()
    runner = handle.version.engine.runner
    forward = runner.forward

    def gated_forward(steps):
        gate.wait()
        return forward(steps)

    runner.forward = gated_forward
    yield kernel, handle, gate, alerts
    gate.set()
    kernel.close()


def test_a_stalled_engine_is_reported_and_its_requests_fail(gated):
    kernel, handle, gate, alerts = gated
    thread, box = in_thread(handle.generate, "Hello there", max_tokens=4)
    wait_for(lambda: handle.status()["running"] == 1)
    engine = handle.version.engine
    wait_for(lambda: engine.stalled_for() > 0.05)
    assert kernel.lifecycle.check_stalls(timeout=0.05) == ["m"]
    thread.join(10)
    assert isinstance(box.get("error"), EngineStalledError) and "made no progress" in str(box["error"])
    status = handle.status()
    assert status["stalled_since"] is not None and status["stalled_seconds"] > 0
    assert alerts.seen == [("m", "engine_stalled_seconds", "firing")]
    # It moves again: the alert resolves, and the model serves.
    gate.set()
    wait_for(lambda: engine.stalled_for() == 0.0)
    assert kernel.lifecycle.check_stalls(timeout=0.05) == []
    assert alerts.seen[-1] == ("m", "engine_stalled_seconds", "resolved")
    assert handle.status()["stalled_since"] is None
    assert handle.generate("Hello", max_tokens=2).completion_tokens == 2


def test_work_arriving_at_a_long_idle_engine_starts_its_stall_clock(gated):
    """A watchdog pass between a request's arrival and the engine thread taking it up must
    not count the idle time before it: the request would fail at once (seen under Ray)."""
    kernel, handle, gate, alerts = gated
    engine = handle.version.engine
    engine.scheduler.progress_at -= 100  # idle for 100 s (its thread waits, it writes no more)
    thread, box = in_thread(handle.generate, "Hello there", max_tokens=4)
    wait_for(lambda: handle.status()["running"] == 1)  # taken up; its step waits on the gate
    assert engine.stalled_for() < 50
    assert kernel.lifecycle.check_stalls(timeout=50) == [] and alerts.seen == []
    gate.set()
    thread.join(10)
    assert box["result"].completion_tokens == 4


def test_a_model_that_moves_is_never_reported(gated):
    kernel, handle, gate, alerts = gated
    gate.set()
    assert handle.generate("Hello", max_tokens=3).completion_tokens == 3
    assert kernel.lifecycle.check_stalls(timeout=0.0) == [] and alerts.seen == []


def test_the_watchdog_thread_runs_on_its_own(fake_plugin, tmp_path):
    alerts = Alerts()
    with llmk.Kernel(plugins=[fake_plugin, alerts], autoload=False, cache_dir=tmp_path / "cache",
                     stall_timeout=0.2) as kernel:
        handle = load_fake(kernel, "m")
        gate = threading.Event()
        runner = handle.version.engine.runner
        forward = runner.forward
        runner.forward = lambda steps: (gate.wait(), forward(steps))[1]
        with pytest.raises(EngineStalledError):
            handle.generate("Hello", max_tokens=2)  # it waits until the watchdog fails it
        assert ("m", "engine_stalled_seconds", "firing") in alerts.seen
        gate.set()


def test_prompt_tokens_waiting_have_a_budget(gated):
    kernel, handle, gate, _ = gated
    engine = handle.version.engine
    first = engine.submit(engine.prompt_ids("word " * 40), llmk.SamplingParams(max_tokens=2))
    wait_for(lambda: engine.backlog()["running"] == 1)  # admitted; its prompt waits on the gate
    with pytest.raises(QueueFullError, match="max_queued_prompt_tokens"):
        handle.generate("word " * 40, max_tokens=2)
    gate.set()
    assert len(list(first)) == 2
    assert handle.generate("word " * 40, max_tokens=2).completion_tokens == 2  # room again


def test_text_with_a_lone_surrogate_is_refused_by_name(kernel):
    handle = load_fake(kernel, "m")
    with pytest.raises(OptionsError, match="lone surrogate"):
        handle.generate("bad \ud800 text", max_tokens=2)
    with pytest.raises(OptionsError, match="lone surrogate"):
        handle.chat([{"role": "user", "content": "\udfff"}], max_tokens=2)
    with pytest.raises(OptionsError, match="seed"):
        handle.generate("Hi", max_tokens=2, seed=-1)
    assert handle.generate("still fine", max_tokens=2).completion_tokens == 2


def test_a_config_with_a_duplicate_key_is_refused_naming_it(tmp_path):
    path = tmp_path / "llmk.yaml"
    path.write_text("models:\n  chat: {source: builtin:smollm2}\n  chat: {source: builtin:minilm}\n")
    with pytest.raises(ConfigError, match=r"'chat' is given twice \(lines 2 and 3\)"):
        load_config(path)
    path.write_text("server:\n  port: 1\n  host: a\n  port: 2\n")
    with pytest.raises(ConfigError, match=r"'port' is given twice \(lines 2 and 4\)"):
        load_config(path)
    path.write_text("models:\n  chat: {source: builtin:smollm2, backend: torch, backend: openvino}\n")
    with pytest.raises(ConfigError, match="'backend' is given twice"):
        load_config(path)
