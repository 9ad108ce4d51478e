"""Periodic, gated updates: a model spec's ``update:`` keeps the model current.

The kernel's ``Updater`` watches each such model's data directory. When it is due
(``every``, or each poll for ``on change``) and the directory changed since the
last attempt, one update runs, each step a ``model.update_*`` event, a
``model_update`` hook call and, at its end, a count in ``kernel.metrics()["updates"]``:

1. ``started``: which files are new.
2. ``tuned``: a worker process — niced, with ``threads`` CPU threads, never the
   serving threads — LoRA-tunes the source on all of the directory's data (cached
   like ``llmk tune``), then scores the serving model and the candidate on the eval
   text and on the new files' held-out samples.
3. ``passed`` or ``rejected`` (with the reason): the candidate must be
   ``min_improvement`` better on the new data and at most ``max_regression`` worse
   on the eval text.
4. ``swapped``: the candidate (the source with the adapter merged in, then the
   spec's passes) replaces the serving version by a hot-swap: no request fails.
   Rejected, or ``failed`` anywhere: the old version keeps serving, and the same
   data is not tried again until it changes.

``kernel.status()`` shows each model's ``updates``: its history, newest last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmk.errors import LlmkError
from llmk.logs import get_logger

if TYPE_CHECKING:
    from llmk.kernel import Kernel
    from llmk.spec import ModelSpec, UpdateSpec

log = get_logger("llmk.update")

#: The files of a data directory that are data (llmk tune's JSONL).
DATA_GLOB = "*.jsonl"


class UpdateError(LlmkError):
    """An update of ``name`` could not be made (the tuning worker failed): the old version keeps serving."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"update of model {name!r} failed: {reason}")


@dataclass
class UpdateRecord:
    """One update attempt, as ``kernel.status()`` shows it."""

    started_at: float
    files: list[str]  # the new or changed data files
    result: str = "running"  # swapped, rejected, failed
    reason: str | None = None
    adapter: str | None = None
    #: Perplexities: serving and candidate, on the eval text and on the new data's held-out samples.
    scores: dict[str, float] = field(default_factory=dict)
    tune_seconds: float | None = None
    version: int | None = None  # the version swapped in
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Watch:
    spec: UpdateSpec
    source: str
    passes: tuple[Any, ...]  # the configured passes, which the adapter goes before
    checked_at: float | None = None
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)  # file -> (size, mtime_ns) at the last attempt
    adapter: str | None = None  # the adapter of the version an update swapped in
    history: list[UpdateRecord] = field(default_factory=list)


def snapshot(directory: str) -> dict[str, tuple[int, int]]:
    """The data files of ``directory`` with their size and modification time."""
    path = Path(directory)
    if not path.is_dir():
        return {}
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob(DATA_GLOB)) if f.is_file()}


def judge(spec: UpdateSpec, scores: dict[str, float]) -> str | None:
    """Why the candidate fails the gate, or ``None`` when it passes."""
    gain = (scores["serving_new"] - scores["candidate_new"]) / scores["serving_new"]
    loss = (scores["candidate_eval"] - scores["serving_eval"]) / scores["serving_eval"]
    if gain < spec.min_improvement:
        return (f"on the new data, perplexity {scores['serving_new']:.3f} -> {scores['candidate_new']:.3f} "
                f"({gain:+.1%} better; min_improvement {spec.min_improvement:.1%})")
    if loss > spec.max_regression:
        return (f"on the eval text, perplexity {scores['serving_eval']:.3f} -> {scores['candidate_eval']:.3f} "
                f"({loss:+.1%} worse; max_regression {spec.max_regression:.1%})")
    return None


class Updater:
    """The kernel's watcher of models with an ``update`` policy; ``tick`` runs what is due."""

    def __init__(self, kernel: Kernel, poll: float):
        self.kernel, self.poll = kernel, poll
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._running = threading.Lock()  # one update at a time: they compete for the same cores
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what is watched -------------------------------------------------------------
    def watch(self, name: str, spec: ModelSpec) -> None:
        """Follow ``spec.update`` for ``name`` (or stop, when it has none). The same
        policy asked again keeps its state and history."""
        with self._lock:
            current = self._watches.get(name)
            if spec.update is None:
                self._watches.pop(name, None)
                return
            if current is not None and current.spec == spec.update:
                return
            self._watches[name] = _Watch(spec.update, spec.source, spec.passes)
        if self.poll > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llmk-updater", daemon=True)
            self._thread.start()

    def forget(self, name: str) -> None:
        with self._lock:
            self._watches.pop(name, None)

    def policy(self, name: str) -> UpdateSpec | None:
        with self._lock:
            watch = self._watches.get(name)
            return None if watch is None else watch.spec

    def history(self, name: str) -> list[dict[str, Any]] | None:
        with self._lock:
            watch = self._watches.get(name)
            return None if watch is None else [r.as_dict() for r in watch.history]

    # -- running ---------------------------------------------------------------------
    def tick(self) -> list[UpdateRecord]:
        """Run the updates that are due now (on the kernel's clock), one after another."""
        now = self.kernel.lifecycle.clock()
        with self._lock:
            due = [(name, w) for name, w in self._watches.items()
                   if w.checked_at is None or w.spec.interval is None or now - w.checked_at >= w.spec.interval]
        records = []
        for name, watch in due:
            watch.checked_at = now
            files = snapshot(watch.spec.data)
            new = [f for f, stamp in files.items() if watch.seen.get(f) != stamp]
            if not new:
                continue
            watch.seen = files
            records.append(self.run(name, watch, new))
        return records

    def run(self, name: str, watch: _Watch, new: list[str]) -> UpdateRecord:
        record = UpdateRecord(time.time(), new)
        watch.history.append(record)
        with self._running:
            self._step(name, "started", files=new)
            try:
                self._update(name, watch, record)
            except Exception as error:  # noqa: BLE001 - any failure keeps the old version; it is reported
                record.result, record.reason = "failed", str(error)
                self._step(name, "failed", error=str(error))
            record.finished_at = time.time()
        self.kernel.lifecycle.stats.count("updates", record.result)
        return record

    def _update(self, name: str, watch: _Watch, record: UpdateRecord) -> None:
        result = self._tune(name, watch, record.files)
        record.adapter, record.scores = result["adapter"], result["scores"]
        record.tune_seconds = result["seconds"]
        self._step(name, "tuned", adapter=record.adapter, seconds=round(record.tune_seconds, 1), **record.scores)
        reason = judge(watch.spec, record.scores)
        if reason is not None:
            record.result, record.reason = "rejected", reason
            self._step(name, "rejected", reason=reason)
            return
        self._step(name, "passed", **record.scores)
        passes = [{"name": "lora", "options": {"adapter": record.adapter}}, *(p.model_dump() for p in watch.passes)]
        handle = self.kernel.swap(name, passes=passes, max_ppl_increase=None)
        watch.adapter = record.adapter
        record.result, record.version = "swapped", handle.version.number
        self._step(name, "swapped", version=record.version, adapter=record.adapter)

    def _tune(self, name: str, watch: _Watch, new: list[str]) -> dict[str, Any]:
        """Tune and score in a worker process (see ``main``); its result."""
        spec = watch.spec
        with tempfile.TemporaryDirectory(prefix="llmk-update-") as work:
            job = {"cache_dir": str(self.kernel.cache.root), "source": watch.source, "data": spec.data,
                   "new": new, "eval": spec.eval, "serving_adapter": watch.adapter, "options": spec.tune,
                   "threads": spec.threads, "nice": spec.nice, "result": os.path.join(work, "result.json")}
            Path(work, "job.json").write_text(json.dumps(job))
            threads = str(spec.threads)
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                   "TOKENIZERS_PARALLELISM": "false"}
            try:
                run = subprocess.run([sys.executable, "-m", "llmk.update", os.path.join(work, "job.json")],
                                     env=env, capture_output=True, text=True, timeout=spec.timeout_seconds)
            except subprocess.TimeoutExpired:  # subprocess.run killed the worker
                raise UpdateError(name, f"the tuning worker ran past timeout={spec.timeout} and was killed") from None
            result = Path(job["result"])
            if not result.is_file():
                raise UpdateError(name, f"the tuning worker exited with {run.returncode}: {run.stderr[-2000:]}")
            answer = json.loads(result.read_text())
        if "error" in answer:
            raise UpdateError(name, answer["error"])
        return answer

    def _step(self, name: str, stage: str, **detail: Any) -> None:
        log.info(f"model.update_{stage}", model=name, **detail)
        self.kernel.plugins.notify("model_update", name=name, stage=stage, detail=detail)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 - the watcher must outlive one bad pass
                log.error("model.update_loop_failed", error=repr(error))

    def stop(self) -> None:
        self._stop.set()


# -- the worker process ------------------------------------------------------------------------------------


def work(job: dict[str, Any]) -> dict[str, Any]:
    """Tune the source on every data file and score the serving model and the candidate."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmk.kernel import Kernel
    from llmk.sources import load_hf_model
    from llmk.tune import TuneOptions, perplexity, read_samples, split

    torch.set_num_threads(job["threads"])
    with Kernel(cache_dir=job["cache_dir"]) as kernel, tempfile.TemporaryDirectory() as work_dir:
        options = TuneOptions(**job["options"])
        base = kernel.hf_source(job["source"])
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = load_hf_model(AutoModelForCausalLM, base, dtype=torch.float32)
        max_length = options.max_length or int(getattr(model.config, "max_position_embeddings", 2048))
        files = sorted(Path(job["data"]).glob(DATA_GLOB))
        for file in files:  # a bad line is named in its own file, not in the joined one
            read_samples(file, tokenizer, max_length)
        # All of the data in one file: the adapter is keyed by its content, so unchanged data is not tuned again.
        data = Path(work_dir, "data.jsonl")
        data.write_text("".join(_lines(f) for f in files))
        started = time.perf_counter()
        tuned = kernel.tune(job["source"], data, **job["options"])
        seconds = time.perf_counter() - started
        # The new files' samples that tuning held out (all of them if it held none out): unseen text.
        held = split(read_samples(data, tokenizer, max_length), options.held_out, options.seed)[1]
        fresh = [s for f in job["new"] for s in read_samples(Path(f), tokenizer, max_length)]
        new = [s for s in fresh if s in held] or fresh
        evaluation = read_samples(Path(job["eval"]), tokenizer, max_length)
        scores = {}
        for who, adapter in (("serving", job["serving_adapter"]), ("candidate", str(tuned.adapter))):
            scored = model if adapter is None else PeftModel.from_pretrained(model, adapter)
            scores[f"{who}_eval"] = perplexity(scored, evaluation)
            scores[f"{who}_new"] = perplexity(scored, new)
            if adapter is not None:
                model = scored.unload()  # the base model again, for the next one
    return {"adapter": str(tuned.adapter), "scores": scores, "seconds": seconds}


def _lines(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text if text.endswith("\n") or not text else text + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m llmk.update JOB``: run ``work`` and write its result (or the error) where the job says."""
    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    os.nice(job["nice"])  # before anything starts a thread: each inherits it
    try:
        answer = work(job)
    except LlmkError as error:
        answer = {"error": str(error)}
    Path(job["result"]).write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
