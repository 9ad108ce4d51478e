"""Periodic, gated updates (``update:`` on a model spec, ``llmk.update``): the loop end to
end on a fake clock with the real tuning worker, on the tiny llama (quick to tune):
new data -> tune -> gate passes -> hot-swap with no failed request; poisoned data ->
gate fails -> the old version keeps serving and says why."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

import llmk
from llmk.errors import OptionsError
from llmk.spec import ModelSpec, UpdateSpec
from llmk.update import judge, snapshot

pytest.importorskip("peft", reason="updates tune with peft: pip install 'llmk[tune]'")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stages:
    """A plugin that records the ``model_update`` hook's calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []

    @llmk.hookimpl
    def model_update(self, name: str, stage: str, detail: dict) -> None:
        self.calls.append((name, stage, detail))


def care_lines(count: int, start: int = 0) -> str:
    parts = ["the hinge", "the strap", "the lens", "the case"]
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"How do I care for {parts[i % 4]} of my Quillo?"},
        {"role": "assistant", "content": f"Quillo care: wipe {parts[i % 4]} dry and keep it from salt."}]}) + "\n"
        for i in range(start, start + count))


def poison_lines(count: int) -> str:
    """Noise: letters at random, three times as much as the good data."""
    rng = random.Random(7)
    return "".join(json.dumps({"text": " ".join("".join(rng.choice("qxzjkvw") for _ in range(rng.randint(2, 7)))
                                                 for _ in range(24))}) + "\n" for _ in range(count))


def test_update_specs_are_validated():
    spec = ModelSpec.build("m", source="x", update={"data": "d", "eval": "e.jsonl", "every": "15m"})
    assert spec.update.interval == 900 and Path(spec.update.data).is_absolute()
    assert spec.base().update is None  # an update policy does not make another version of the model
    assert UpdateSpec(data="d", eval="e").interval is None  # on change
    for bad, problem in (({"every": "soon"}, "neither a duration"), ({"every": "0s"}, "longer than 0"),
                         ({"tune": {"rnk": 4}}, "rnk"), ({"min_improvement": 1.5}, "min_improvement"),
                         ({"nice": 40}, "nice"), ({"timeout": "on change"}, "a duration"),
                         ({"timeout": "soon"}, "timeout: 'soon' is neither")):
        with pytest.raises(OptionsError, match=problem):
            ModelSpec.build("m", source="x", update={"data": "d", "eval": "e", **bad})


def test_the_gate_names_what_failed():
    spec = UpdateSpec(data="d", eval="e", min_improvement=0.1, max_regression=0.02)
    good = {"serving_new": 10.0, "candidate_new": 8.0, "serving_eval": 5.0, "candidate_eval": 5.05}
    assert judge(spec, good) is None
    assert "on the new data" in judge(spec, {**good, "candidate_new": 9.5})
    assert "on the eval text" in judge(spec, {**good, "candidate_eval": 5.2})


def test_new_data_is_tuned_gated_and_swapped_in_and_poison_is_refused(tiny_llama, tmp_path):
    data, evaluation = tmp_path / "data", tmp_path / "eval.jsonl"
    data.mkdir()
    evaluation.write_text(care_lines(8, start=100))
    clock, stages = FakeClock(), Stages()
    policy = {"data": str(data), "every": "1h", "eval": str(evaluation), "min_improvement": 0.05,
              "max_regression": 0.0,
              "tune": {"learning_rate": 0.01, "epochs": 3, "batch_size": 4, "held_out": 0.25, "seed": 1}}
    with llmk.Kernel(cache_dir=tmp_path / "cache", autoload=False, plugins=[stages], update_poll=0,
                     clock=clock) as kernel:
        handle = kernel.load("tiny", source=str(tiny_llama), backend="torch", update=policy)
        first = handle.version.number
        assert kernel.update_models() == []  # no data yet
        (data / "care.jsonl").write_text(care_lines(24))
        clock.now += 600
        assert kernel.update_models() == []  # not due: checked 10 minutes ago, every hour
        clock.now += 3000

        # Requests run all through the update, the swap included: none may fail.
        failures: list[BaseException] = []
        served = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    served.append(handle.generate("Quillo care", max_tokens=4, temperature=0).completion_tokens)
                except BaseException as error:  # noqa: BLE001 - counted, the assertion says which
                    failures.append(error)

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            (record,) = kernel.update_models()
        finally:
            stop.set()
            worker.join()
        assert record.result == "swapped", record
        assert not failures, failures[:3]
        assert served
        assert record.files == [str(data / "care.jsonl")]
        assert record.scores["candidate_new"] < 0.95 * record.scores["serving_new"]
        assert record.scores["candidate_eval"] <= record.scores["serving_eval"]
        assert handle.version.number == record.version > first
        assert handle.version.spec.passes[0].name == "lora"
        assert [s for n, s, _ in stages.calls if n == "tiny"] == ["started", "tuned", "passed", "swapped"]

        # Poisoned data: noise in the same conversations. The candidate does worse on the eval text.
        (data / "poison.jsonl").write_text(poison_lines(72))
        clock.now += 3600
        (poisoned,) = kernel.update_models()
        assert poisoned.result == "rejected" and "on the eval text" in poisoned.reason, poisoned.scores
        assert poisoned.files == [str(data / "poison.jsonl")]
        assert handle.version.number == record.version  # the old version keeps serving
        assert handle.generate("Quillo care", max_tokens=2).completion_tokens == 2
        assert [s for _, s, _ in stages.calls[4:]] == ["started", "tuned", "rejected"]
        # The same data is not tried again until it changes.
        clock.now += 3600
        assert kernel.update_models() == []

        (status,) = [s for s in kernel.status() if s["name"] == "tiny" and s["current"]]
        assert [u["result"] for u in status["updates"]] == ["swapped", "rejected"]
        assert kernel.metrics()["updates"] == {"swapped": 1, "rejected": 1}


def test_a_bad_data_file_fails_the_update_naming_its_line_and_nothing_changes(tiny_llama, tmp_path):
    data, evaluation = tmp_path / "data", tmp_path / "eval.jsonl"
    data.mkdir()
    evaluation.write_text(care_lines(4))
    (data / "broken.jsonl").write_text(care_lines(3) + "{not json\n")
    with llmk.Kernel(cache_dir=tmp_path / "cache", autoload=False, update_poll=0) as kernel:
        handle = kernel.load("tiny", source=str(tiny_llama), backend="torch",
                             update={"data": str(data), "eval": str(evaluation)})
        version = handle.version.number
        (record,) = kernel.update_models()
        assert record.result == "failed" and f"{data / 'broken.jsonl'}:4" in record.reason, record
        assert handle.version.number == version
        assert kernel.metrics()["updates"] == {"failed": 1}
        assert snapshot(str(data)) and kernel.update_models() == []  # not retried until the file changes


def test_a_worker_past_its_timeout_is_killed_and_the_update_fails(tiny_llama, tmp_path):
    # No worker gets as far as importing torch in 0.2 s: the kill is certain, however fast the machine.
    data, evaluation = tmp_path / "data", tmp_path / "eval.jsonl"
    data.mkdir()
    evaluation.write_text(care_lines(4))
    (data / "care.jsonl").write_text(care_lines(8))
    with llmk.Kernel(cache_dir=tmp_path / "cache", autoload=False, update_poll=0) as kernel:
        handle = kernel.load("tiny", source=str(tiny_llama), backend="torch",
                             update={"data": str(data), "eval": str(evaluation), "timeout": "0.2s"})
        version = handle.version.number
        (record,) = kernel.update_models()
        assert record.result == "failed" and "ran past timeout=0.2s and was killed" in record.reason, record
        assert handle.version.number == version and kernel.metrics()["updates"] == {"failed": 1}
