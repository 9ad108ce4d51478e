"""``Kernel``: plugins, the cache and the named models, in one object a host app owns."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from llmk.artifact import Artifact
from llmk.backend import Backend, BackendOptions
from llmk.cache import Cache, key_digest
from llmk.errors import (
    BackendUnavailableError,
    HealthCheckError,
    LlmkError,
    OptionsError,
    QualityGateError,
    UnsupportedError,
    format_validation_error,
)
from llmk.generation import Engine, SamplingParams, default_kv_tokens
from llmk.handle import ModelHandle
from llmk.kv import config_max_context
from llmk.lifecycle import Lifecycle, ModelVersion
from llmk.logs import get_logger
from llmk.memory import parse_size
from llmk.monitor import AlertRule
from llmk.optimizer import Optimizer, PassOptions
from llmk.plugins import Plugins, Registered
from llmk.sources import as_hf
from llmk.spec import ModelSpec, PassSpec
from llmk.tokenizer import Tokenizer
from llmk.update import Updater

if TYPE_CHECKING:
    from llmk.tune import TuneResult
    from llmk.update import UpdateRecord

log = get_logger("llmk.kernel")

WARMUP_PROMPT = "Hello"
QUALITY_TEXT = Path(__file__).parent / "data" / "wiki.txt"


class Kernel:
    """Discovers plugins and serves named models. Loads nothing until asked.

    ``disable``/``autoload``/``plugins`` control which plugins take part (see
    ``llmk.plugins``); ``cache_dir`` holds converted sources, exports and pass
    outputs (default ``$LLMK_CACHE_DIR`` or ``~/.cache/llmk``).

    Lifecycle (``llmk.lifecycle``): ``memory_budget`` (bytes or ``"8GiB"``;
    default unlimited) bounds what loaded models may hold, evicting idle ones to
    make room; ``drain_timeout`` is how long a retired version waits for its
    running requests; ``wait_timeout`` how long a request waits for a model that
    is loading; ``alerts`` are threshold rules (``AlertRule``) reported through
    the ``model_alert`` hook; ``reap_interval`` is how often idle models past
    their keep-alive are unloaded (0: only when ``reap()`` is called);
    ``max_queue`` is how many requests may wait per model before
    ``QueueFullError``; ``stall_timeout`` (seconds; ``None`` turns the watchdog
    off) is how long an engine may have work and make no progress before it is
    reported and its requests fail (``Lifecycle.check_stalls``); ``update_poll``
    is how often models with an ``update`` policy are checked for new data (0:
    only when ``update_models()`` is called; ``llmk.update``); ``clock``
    (monotonic seconds) is injectable for tests.
    """

    def __init__(
        self,
        *,
        cache_dir: str | Path | None = None,
        disable: Iterable[str] = (),
        autoload: bool | None = None,
        plugins: Iterable[Any] = (),
        memory_budget: int | str | None = None,
        drain_timeout: float = 60.0,
        wait_timeout: float = 300.0,
        alerts: Iterable[AlertRule] = (),
        reap_interval: float = 5.0,
        max_queue: int = 1024,
        stall_timeout: float | None = 120.0,
        update_poll: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.plugins = Plugins(disable=disable, autoload=autoload, plugins=plugins)
        self.cache = Cache(cache_dir)
        self.max_queue = max_queue
        self.lifecycle = Lifecycle(self, notify=self.plugins.notify, budget=parse_size(memory_budget),
                                   clock=clock, drain_timeout=drain_timeout, wait_timeout=wait_timeout,
                                   alerts=list(alerts))
        self._reaper = _Reaper(self.lifecycle, reap_interval) if reap_interval > 0 else None
        self.stall_timeout = stall_timeout
        self._adapters: dict[str, dict[str, str]] = {}  # name -> its adapters (served as name:ADAPTER)
        self._batched: set[str] = set()  # names whose engine applies their adapters per request
        # name -> (base spec, adapters) of a load in flight: its engine takes them before warming up
        self._installing: dict[str, tuple[ModelSpec, dict[str, str]]] = {}
        self._watchdog = _Watchdog(self.lifecycle, stall_timeout) if stall_timeout else None
        self.updates = Updater(self, update_poll)

    # -- serving ---------------------------------------------------------------
    def load(self, name: str, source: str | None = None, *, pinned: bool = False, keep_alive: float | None = None,
             **fields: Any) -> ModelHandle:
        """Load ``source`` as ``name`` and return its handle.

        ``fields`` are those of ``ModelSpec``: ``backend`` (default ``auto``),
        ``device``, ``dtype``, ``passes``, ``options`` (backend options),
        ``max_ppl_increase`` (the passes' quality gate), ``max_batch_size``.
        ``pinned`` models are never evicted; ``keep_alive`` (seconds) protects a
        model from eviction for that long after its last use, after which it is
        unloaded once idle. Loading a name that is already loaded with the same
        spec returns its handle; with a different spec it hot-swaps. Concurrent
        loads of the same spec share one load.
        """
        spec = ModelSpec.build(f"model {name!r}", source=source, **fields)
        if self._watchdog is not None:
            self._watchdog.start()
        self._load_with_adapters(name, spec, pinned, keep_alive)
        if self._reaper is not None and keep_alive is not None:
            self._reaper.start()
        return ModelHandle(self, name)

    def _load_with_adapters(self, name: str, spec: ModelSpec, pinned: bool, keep_alive: float | None) -> None:
        """``name`` serves ``spec``; each adapter serves as ``name:ADAPTER``: in
        ``name``'s own batches where its runner applies adapters per request (torch),
        else as a version of its own with the adapter merged in (graph backends).
        A change of adapters alone leaves ``name``'s version serving as it is."""
        base = spec.base()
        self._installing[name] = (base, dict(spec.adapters))
        try:
            version = self.lifecycle.load(name, base, pinned=pinned, keep_alive=keep_alive)
        finally:
            self._installing.pop(name, None)
        engine = version.engine
        variants: dict[str, str] = {}
        if engine is not None and engine.batches_adapters:
            engine.set_adapters(spec.adapters)  # a failure raises here and changes nothing
            self._batched.add(name)
        else:
            self._batched.discard(name)
            variants = spec.adapters
        for adapter in variants:  # a failure raises here: the adapters recorded stay those serving
            self.lifecycle.load(f"{name}:{adapter}", spec.variant(adapter), pinned=pinned, keep_alive=keep_alive)
        for other in self._variants(name):
            if other.split(":", 1)[1] not in variants:
                self.lifecycle.unload(other, None)
        self._adapters[name] = dict(spec.adapters)
        self.updates.watch(name, spec)

    def route(self, name: str, adapter: str | None) -> tuple[str, str | None]:
        """Where a call for ``name`` with ``adapter`` goes: the name whose version to
        lease, and the adapter its engine applies (``None``: the version is the model
        alone, or a variant with the adapter merged in)."""
        if adapter is None:
            return name, None
        variant = f"{name}:{adapter}"
        if name in self._batched and adapter in self._adapters.get(name, {}):
            return name, adapter
        self.lifecycle.check_known(variant)
        return variant, None

    def _variants(self, name: str) -> list[str]:
        return [other for other in self.lifecycle.names() if other.startswith(f"{name}:")]

    def swap(self, name: str, source: str | None = None, **fields: Any) -> ModelHandle:
        """Hot-swap ``name`` to a new spec; fields not given keep their current value.

        The new version is loaded and warmed up beside the old one when memory
        allows, then takes over; calls already running finish on the old
        version, which is freed once they are done. When both do not fit, the
        old version is drained and freed first ("replace" mode, reported in the
        ``model.swapped`` event and the lifecycle metrics), and requests wait
        for the new one. If the new version fails (load, warm-up, health check
        or quality gate), the old one keeps serving (in replace mode it is
        loaded again) and the error is raised.
        """
        current = self.lifecycle.current(name)
        policy = self.updates.policy(name)
        merged = {**current.spec.model_dump(), "adapters": self._adapters.get(name, {}),
                  "update": None if policy is None else policy.model_dump()}
        merged.update(fields)
        if source is not None:
            merged["source"] = source
        spec = ModelSpec.build(f"model {name!r}", **merged)
        self._load_with_adapters(name, spec, current.pinned, current.keep_alive)
        return ModelHandle(self, name)

    # -- adapting ---------------------------------------------------------------
    def tune(self, source: str, data: str | Path, *, device: str = "cpu", **options: Any) -> TuneResult:
        """LoRA-tune ``source`` (a causal LM) on ``data`` (JSONL of ``messages`` or
        ``text``, or a text file); ``options`` are ``llmk.tune.TuneOptions``'s. The
        adapter is cached (the same tuning asked again is not run again); the result
        holds its path and the held-out perplexity before and after."""
        from pydantic import ValidationError

        from llmk.backend import missing_modules
        from llmk.tune import TuneOptions, tune

        reason = missing_modules(("peft",))
        if reason:
            raise UnsupportedError(f"tuning needs peft ({reason}): pip install 'llmk[tune]'")
        # Tuning runs on PyTorch: the devices the torch backend can use here.
        device = _pick_device(self.plugins.backends.get("torch").cls, device, device.split(":")[0])

        try:
            settings = TuneOptions(**options)
        except ValidationError as error:
            raise OptionsError("tune", format_validation_error(error)) from None
        base = as_hf(self.plugins.resolve_source(source, self.cache), self.cache)
        if base.task != "generate":
            raise UnsupportedError(f"{source} embeds; only a causal LM can be tuned")
        return tune(base, Path(data), settings, self.cache, device=device)

    def hf_source(self, source: str) -> Path:
        """``source`` as a Hugging Face model directory (a GGUF converted once, into the cache)."""
        return as_hf(self.plugins.resolve_source(source, self.cache), self.cache).path

    def update_models(self) -> list[UpdateRecord]:
        """Run the periodic updates that are due now (the updater thread does this
        every ``update_poll``); returns what each did."""
        return self.updates.tick()

    def get(self, name: str) -> ModelHandle:
        """The handle of a model that is serving or loading (its calls wait for it);
        ``NAME:ADAPTER`` gives NAME's handle with that adapter."""
        base, colon, adapter = name.partition(":")
        if colon and base in self._batched and adapter in self._adapters.get(base, {}):
            return ModelHandle(self, base, adapter)
        self.lifecycle.check_known(name)
        return ModelHandle(self, name)

    def unload(self, name: str, *, timeout: float | None = None) -> None:
        """Stop routing requests to ``name`` (and its adapters' variants), wait for
        running ones, free the memory."""
        self.lifecycle.unload(name, timeout)
        for variant in self._variants(name):
            self.lifecycle.unload(variant, timeout)
        self._adapters.pop(name, None)
        self._batched.discard(name)
        self.updates.forget(name)

    def names(self) -> list[str]:
        """Every model serving, its adapters as ``NAME:ADAPTER``."""
        names = self.lifecycle.names()
        batched = [f"{name}:{adapter}" for name in names if name in self._batched
                   for adapter in self._adapters.get(name, {})]
        return sorted({*names, *batched})

    def status(self) -> list[dict[str, Any]]:
        """Every version loading, serving or draining (and a name's last failed
        load): state, spec, backend, device, memory, counters and latencies; a
        model's current version with an ``update`` policy also has its ``updates``."""
        statuses = self.lifecycle.status()
        for status in statuses:
            history = self.updates.history(status["name"]) if status["current"] else None
            if history is not None:
                status["updates"] = history
        return statuses

    def metrics(self) -> dict[str, Any]:
        """Kernel-wide figures: the memory budget and use, loads, swaps and
        rollbacks by result, evictions by reason."""
        return {"memory": self.lifecycle.memory(), **self.lifecycle.stats.snapshot()}

    def reap(self) -> list[str]:
        """Unload idle models whose keep-alive has expired (the reaper thread
        does this every ``reap_interval``); returns their names."""
        return self.lifecycle.reap()

    def close(self, timeout: float | None = None) -> None:
        """Unload every model; each waits up to ``timeout`` (default
        ``drain_timeout``) for its running requests."""
        if self._reaper is not None:
            self._reaper.stop()
        if self._watchdog is not None:
            self._watchdog.stop()
        self.updates.stop()
        self.lifecycle.close(timeout)

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- async variants --------------------------------------------------------
    async def aload(self, name: str, source: str | None = None, **fields: Any) -> ModelHandle:
        return await asyncio.to_thread(self.load, name, source, **fields)

    async def aswap(self, name: str, source: str | None = None, **fields: Any) -> ModelHandle:
        return await asyncio.to_thread(self.swap, name, source, **fields)

    async def aunload(self, name: str) -> None:
        await asyncio.to_thread(self.unload, name)

    # -- the three steps of a load (``llmk.lifecycle.Steps``) ----------------------
    def prepare(self, version: ModelVersion) -> int:
        """Resolve names, the source and the backend; build the artifact (cached);
        return the backend's memory estimate."""
        spec = version.spec
        # Names and options first: a typo must not cost a model conversion.
        if spec.backend != "auto":
            self.plugins.backends.get(spec.backend)
        passes = [self._resolve_pass(p) for p in spec.passes]
        source = self.plugins.resolve_source(spec.source, self.cache)
        backend_cls, device = self._choose_backend(spec, source)
        backend = backend_cls()
        options = _backend_options(backend_cls, spec.options)
        dtype = spec.dtype if spec.dtype != "auto" else ("fp32" if device == "cpu" else "bf16")
        version.backend, version.device, version.dtype = backend_cls.name, device, dtype
        base, version.artifact, built = self._prepare(source, backend, dtype, passes)
        version.plan = _Plan(source, backend, options, base, built)
        weights = backend.estimate_memory(version.artifact, device=device, dtype=dtype, options=options)
        if source.task != "generate":
            return weights
        # The KV cache counts in the budget at its capacity, estimated from the model's config.
        per_token = backend.kv_bytes_per_token(source.tokenizer_dir, dtype=dtype, options=options)
        tokens = _kv_tokens(spec, per_token, config_max_context(source.tokenizer_dir))
        draft = self._prepare_draft(version, source, tokens) if spec.draft is not None else 0
        return weights + tokens * per_token + draft

    def start(self, version: ModelVersion) -> None:
        """Load the artifact; run the quality gate when the spec has one."""
        plan: _Plan = version.plan
        spec = version.spec
        runner = plan.backend.load(version.artifact, device=version.device, dtype=version.dtype,
                                   options=plan.options, cache=self.cache)
        draft = None
        if plan.draft is not None:  # the same backend, device, dtype and options as the model
            try:
                draft = plan.backend.load(plan.draft, device=version.device, dtype=version.dtype,
                                          options=plan.options, cache=self.cache)
            except BaseException:
                runner.close()
                raise
        layout = runner.kv_layout
        kv_tokens = _kv_tokens(spec, layout.bytes_per_token, runner.max_context) if layout is not None else None
        version.engine = Engine(runner, Tokenizer(plan.source.tokenizer_dir, source=spec.source), name=version.name,
                                max_batch_size=spec.max_batch_size, max_queue=self.max_queue,
                                prefill_chunk=spec.prefill_chunk, kv_cache_tokens=kv_tokens,
                                prefix_caching=spec.prefix_caching,
                                max_queued_prompt_tokens=spec.max_queued_prompt_tokens,
                                speculative=spec.speculative, draft=draft)
        self._install_adapters(version)
        if plan.built and spec.max_ppl_increase is not None:
            try:
                version.quality = self._quality_gate(version, plan.base, plan.backend, version.device,
                                                     version.dtype, plan.options)
            except QualityGateError:
                # A refused output this load built is not left behind to be loaded again; one that
                # was cached already stays, as other models may serve it (another gate may pass it).
                for output in plan.built:
                    if output.fresh:
                        self.cache.remove(output.path)
                raise

    def _install_adapters(self, version: ModelVersion) -> None:
        """Before a version warms up, its engine takes the adapters it will serve (where
        it applies them per request): those of the load in flight, or, for a version
        brought back after a failed swap, those serving before."""
        engine = version.engine
        assert engine is not None
        installing = self._installing.get(version.name)
        if installing is not None and installing[0] == version.spec:
            adapters = installing[1]
        else:
            adapters = self._adapters.get(version.name, {})
        if adapters and engine.batches_adapters:
            engine.set_adapters(adapters)

    def warm_up(self, version: ModelVersion) -> None:
        """Run one real request through the new version and check what it returns."""
        import numpy as np

        engine = version.engine
        assert engine is not None
        if engine.runner.task == "embed":
            (vector,) = engine.embed([WARMUP_PROMPT])
            healthy = bool(np.isfinite(vector).all()) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
        else:
            # Two tokens: one prefill and one decode step, the two graphs a request runs.
            ids = engine.prompt_ids(WARMUP_PROMPT)
            (result,) = engine.generate([ids], [SamplingParams(max_tokens=2, temperature=0.0)])
            with engine.lock:
                logits = engine.runner.logits(ids)
                draft_logits = engine.draft.logits(ids) if engine.draft is not None else logits
            healthy = result.completion_tokens > 0 and bool(np.isfinite(logits).all()) \
                and bool(np.isfinite(draft_logits).all())
        if not healthy:
            raise HealthCheckError(version.name, "the warm-up request returned non-finite or empty output")

    # -- internals ---------------------------------------------------------------
    def _prepare_draft(self, version: ModelVersion, source: Artifact, kv_tokens: int) -> int:
        """Resolve and build the spec's draft model for the model's backend (no passes),
        refuse one whose vocabulary differs (``DraftModelError``), and return its
        memory estimate: weights, and a KV cache of ``kv_tokens`` positions (the model's)."""
        from llmk.speculative import DraftModelError, check_draft_vocabulary

        spec, plan = version.spec, version.plan
        assert spec.draft is not None
        draft_source = self.plugins.resolve_source(spec.draft, self.cache)
        if draft_source.task != "generate":
            raise DraftModelError(spec.draft, "it does not generate text")
        check_draft_vocabulary(Tokenizer(source.tokenizer_dir, source=spec.source),
                               Tokenizer(draft_source.tokenizer_dir, source=spec.draft), spec.draft)
        _, plan.draft, _ = self._prepare(draft_source, plan.backend, version.dtype, [])
        weights = plan.backend.estimate_memory(plan.draft, device=version.device, dtype=version.dtype,
                                               options=plan.options)
        per_token = plan.backend.kv_bytes_per_token(draft_source.tokenizer_dir, dtype=version.dtype,
                                                    options=plan.options)
        return weights + kv_tokens * per_token

    def _resolve_pass(self, pass_spec: PassSpec) -> tuple[Registered[Optimizer], PassOptions]:
        registered = self.plugins.passes.get(pass_spec.name)
        reason = registered.cls.availability()
        if reason:
            hint = f"; install it with: {registered.cls.install}" if registered.cls.install else ""
            raise UnsupportedError(f"pass {pass_spec.name!r} is not available: {reason}{hint}")
        return registered, registered.cls.options(pass_spec.options)

    def _choose_backend(self, spec: ModelSpec, source: Artifact) -> tuple[type[Backend], str]:
        registry = self.plugins.backends
        task = source.task
        wanted_type = None if spec.device == "auto" else spec.device.split(":")[0]
        if spec.backend != "auto":
            cls = registry.get(spec.backend).cls
            reason = cls.availability()
            if reason:
                raise BackendUnavailableError(cls.name, reason, cls.install)
            if task not in cls.tasks:
                raise UnsupportedError(f"backend {cls.name!r} cannot {task}; it serves: {', '.join(sorted(cls.tasks))}")
            return cls, _pick_device(cls, spec.device, wanted_type)
        candidates = []
        for item in registry.items.values():
            cls = item.cls
            if task not in cls.tasks or cls.availability():
                continue
            try:
                device = _pick_device(cls, spec.device, wanted_type)
            except LlmkError:
                continue
            candidates.append((-cls.rank(device.split(":")[0], source.format), cls.name, cls, device))
        if not candidates:
            raise BackendUnavailableError("auto", f"no available backend can {task} on device {spec.device!r}")
        _, _, cls, device = min(candidates, key=lambda c: c[:2])
        return cls, device

    def _prepare(self, source: Artifact, backend: Backend, dtype: str,
                 passes: list[tuple[Registered[Optimizer], PassOptions]]) -> tuple[Artifact, Artifact, list[Path]]:
        """Run the source-stage passes, export to the backend's format, run the
        backend-stage passes; every step cached.

        Returns the unoptimized (exported) artifact, the final one, and the pass outputs.
        """
        stages = [registered.cls.stage for registered, _ in passes]
        if stages != sorted(stages, key=lambda s: s != "source"):
            first_backend = next(r.cls.name for r, _ in passes if r.cls.stage == "backend")
            late = next(r.cls.name for r, _ in passes[stages.index("backend"):] if r.cls.stage == "source")
            raise UnsupportedError(f"pass {late!r} works on the source model and must come before {first_backend!r}")
        versions = backend.versions()
        built: list[_PassOutput] = []
        if backend.artifact_format != source.format or "source" in stages:
            source = as_hf(source, self.cache)  # a GGUF, for a backend or a pass that reads safetensors
        artifact = source
        for registered, options in passes:
            if registered.cls.stage == "source":
                artifact = self._run_pass(registered, options, artifact, backend, built, key_parts=())
        artifact = self._export(artifact, backend, dtype, versions)
        for registered, options in passes:
            if registered.cls.stage == "backend":
                artifact = self._run_pass(registered, options, artifact, backend, built,
                                          key_parts=(backend.name, dtype, versions))
        base = self._export(source, backend, dtype, versions) if built else artifact
        return base, artifact, built

    def _export(self, source: Artifact, backend: Backend, dtype: str, versions: dict[str, str]) -> Artifact:
        if backend.artifact_format == source.format:
            return source
        key = key_digest(source.digest, backend.name, dtype, versions)
        path = self.cache.build(
            "exports", f"{backend.name}-{key}",
            lambda out: backend.export(source, out, dtype=dtype),
            describe=f"export {source.source} to {backend.name}",
        )
        return source.derive(path, backend.artifact_format, key)

    def _run_pass(self, registered: Registered[Optimizer], options: PassOptions, artifact: Artifact,
                  backend: Backend, built: list[_PassOutput], key_parts: tuple[Any, ...]) -> Artifact:
        optimizer_cls = registered.cls
        if backend.name in optimizer_cls.native:
            log.info("pass.skipped", name=optimizer_cls.name, backend=backend.name,
                     reason=optimizer_cls.native[backend.name])
            return artifact
        if backend.name not in optimizer_cls.backends:
            supported = ", ".join(sorted(optimizer_cls.backends)) or "none"
            raise UnsupportedError(
                f"pass {optimizer_cls.name!r} does not support backend {backend.name!r}; it supports: {supported}"
            )
        key = key_digest(artifact.digest, optimizer_cls.name, optimizer_cls.version, options.model_dump(),
                         registered.plugin.version, *key_parts)
        path, fresh = self.cache.get_or_build(
            "passes", f"{optimizer_cls.name}-{key}",
            lambda out: optimizer_cls().apply(artifact, out, backend=backend.name, options=options),
            describe=f"pass {optimizer_cls.name} on {backend.name}",
        )
        built.append(_PassOutput(path, fresh))
        return artifact.derive(path, artifact.format, key)

    def _quality_gate(self, version: ModelVersion, base: Artifact, backend: Backend, device: str, dtype: str,
                      options: BackendOptions) -> dict[str, float]:
        """Perplexity of the optimized and the unoptimized model on llmk's reference
        text, measured once per artifact pair (cached), against the spec's limit."""
        engine = version.engine
        assert engine is not None
        text = QUALITY_TEXT.read_text()

        def measure(out: Path) -> None:
            baseline_runner = backend.load(base, device=device, dtype=dtype, options=options, cache=self.cache)
            try:
                baseline = Engine(baseline_runner, engine.tokenizer).perplexity(text)  # scoring: no scheduler
            finally:
                baseline_runner.close()
            (out / "quality.json").write_text(json.dumps({"baseline": baseline, "optimized": engine.perplexity(text)}))

        key = key_digest(base.digest, version.artifact.digest, QUALITY_TEXT.name, len(text))
        entry = self.cache.build("quality", key, measure, describe="quality gate perplexity")
        quality = json.loads((entry / "quality.json").read_text())
        quality["increase"] = quality["optimized"] / quality["baseline"] - 1.0
        limit = version.spec.max_ppl_increase
        log.info("model.quality_measured", model=version.name, version=version.number, limit=limit, **quality)
        if quality["increase"] > limit:
            pipeline = " ".join(str(p) for p in version.spec.passes)
            raise QualityGateError(pipeline, quality["baseline"], quality["optimized"], limit)
        return quality


class _PassOutput(NamedTuple):
    path: Path
    fresh: bool  # built by this load (not found in the cache)


@dataclass
class _Plan:
    """What ``prepare`` resolved, for ``start`` to load."""

    source: Artifact
    backend: Backend
    options: BackendOptions
    base: Artifact  # the unoptimized export, the quality gate's baseline
    built: list[_PassOutput]  # the pass outputs this load runs on
    draft: Artifact | None = None  # the draft model, built for the same backend


class _Reaper:
    """A daemon thread that unloads models past their keep-alive."""

    def __init__(self, lifecycle: Lifecycle, interval: float):
        self.lifecycle, self.interval = lifecycle, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmk-reaper", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lifecycle.reap()
            except Exception as error:  # keep reaping; the next pass may succeed
                log.error("model.reap_failed", error=str(error))


class _Watchdog(_Reaper):
    """A daemon thread that reports engines stuck with work (``Lifecycle.check_stalls``)."""

    def __init__(self, lifecycle: Lifecycle, timeout: float):
        super().__init__(lifecycle, min(5.0, timeout / 4))
        self.timeout = timeout

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lifecycle.check_stalls(self.timeout)
            except Exception as error:  # keep watching
                log.error("model.watch_failed", error=str(error))


def _kv_tokens(spec: ModelSpec, bytes_per_token: int, max_context: int) -> int:
    """The KV cache's capacity in token positions, from the spec's ``kv_cache``
    (positions, or a size in bytes), else ``default_kv_tokens``."""
    if isinstance(spec.kv_cache, int):
        return spec.kv_cache
    if isinstance(spec.kv_cache, str):
        size = parse_size(spec.kv_cache, "kv_cache") or 0
        return max(1, size // bytes_per_token) if bytes_per_token else default_kv_tokens(spec.max_batch_size,
                                                                                          max_context)
    return default_kv_tokens(spec.max_batch_size, max_context)


def _backend_options(cls: type[Backend], raw: dict[str, Any]) -> BackendOptions:
    from pydantic import ValidationError

    try:
        return cls.Options.model_validate(raw)
    except ValidationError as error:
        raise OptionsError(f"backend {cls.name!r}", format_validation_error(error)) from None


def _pick_device(cls: type[Backend], requested: str, wanted_type: str | None) -> str:
    if wanted_type is not None and wanted_type not in cls.speed_rank:
        raise UnsupportedError(
            f"backend {cls.name!r} does not run on {wanted_type!r}; it runs on: {', '.join(sorted(cls.speed_rank))}"
        )
    devices = cls.devices()
    if requested == "auto":
        if not devices:
            raise BackendUnavailableError(cls.name, "no usable device")
        return devices[0]
    matches = [d for d in devices if d == requested or (":" not in requested and d.split(":")[0] == requested)]
    if not matches:
        raise BackendUnavailableError(
            cls.name, f"device {requested!r} is not available here; available: {', '.join(devices) or 'none'}"
        )
    return matches[0]
