"""``Kernel``: plugins, the cache and the named models, in one object a host app owns."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmk.artifact import Artifact
from llmk.backend import Backend, BackendOptions
from llmk.cache import Cache, key_digest
from llmk.errors import (
    BackendUnavailableError,
    LlmkError,
    ModelLoadError,
    ModelNotFoundError,
    OptionsError,
    QualityGateError,
    UnsupportedError,
    format_validation_error,
)
from llmk.generation import Engine, SamplingParams
from llmk.handle import ModelHandle
from llmk.lifecycle import ModelVersion, State
from llmk.logs import get_logger
from llmk.optimizer import Optimizer, PassOptions
from llmk.plugins import Plugins, Registered
from llmk.spec import ModelSpec, PassSpec
from llmk.tokenizer import Tokenizer

log = get_logger("llmk.kernel")

WARMUP_PROMPT = "Hello"
QUALITY_TEXT = Path(__file__).parent / "data" / "wiki.txt"


class Kernel:
    """Discovers plugins and serves named models. Loads nothing until asked.

    ``disable``/``autoload``/``plugins`` control which plugins take part (see
    ``llmk.plugins``); ``cache_dir`` holds converted sources, exports and pass
    outputs (default ``$LLMK_CACHE_DIR`` or ``~/.cache/llmk``).
    """

    def __init__(
        self,
        *,
        cache_dir: str | Path | None = None,
        disable: Iterable[str] = (),
        autoload: bool | None = None,
        plugins: Iterable[Any] = (),
        drain_timeout: float = 60.0,
    ):
        self.plugins = Plugins(disable=disable, autoload=autoload, plugins=plugins)
        self.cache = Cache(cache_dir)
        self.drain_timeout = drain_timeout
        self._models: dict[str, ModelVersion] = {}
        self._numbers: dict[str, int] = {}
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()  # one load at a time: loads compete for memory and cores

    # -- serving ---------------------------------------------------------------
    def load(self, name: str, source: str | None = None, **fields: Any) -> ModelHandle:
        """Load ``source`` as ``name`` and return its handle.

        ``fields`` are those of ``ModelSpec``: ``backend`` (default ``auto``),
        ``device``, ``dtype``, ``passes``, ``options`` (backend options),
        ``max_ppl_increase`` (the passes' quality gate), ``max_batch_size``.
        Loading a name that is already loaded with the same spec returns its
        handle; with a different spec it hot-swaps.
        """
        spec = ModelSpec.build(f"model {name!r}", source=source, **fields)
        with self._lock:
            current = self._models.get(name)
        if current is not None and current.spec == spec:
            return ModelHandle(self, name)
        return self._replace(name, spec)

    def swap(self, name: str, source: str | None = None, **fields: Any) -> ModelHandle:
        """Hot-swap ``name`` to a new spec; fields not given keep their current value.

        The new version is loaded and warmed up beside the old one, then takes
        over; calls already running finish on the old version, which is freed
        once they are done. If the new version fails (load, warm-up or quality
        gate), the old one keeps serving and the error is raised.
        """
        current = self._current(name)
        merged = current.spec.model_dump()
        merged.update(fields)
        if source is not None:
            merged["source"] = source
        return self._replace(name, ModelSpec.build(f"model {name!r}", **merged))

    def get(self, name: str) -> ModelHandle:
        self._current(name)
        return ModelHandle(self, name)

    def unload(self, name: str, *, timeout: float | None = None) -> None:
        """Stop routing requests to ``name``, wait for running ones, free the memory."""
        with self._lock:
            version = self._models.pop(name, None)
        if version is None:
            raise ModelNotFoundError(name, self.names())
        self._retire(version, timeout)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def status(self) -> list[dict[str, Any]]:
        """Every model: state, spec, backend, device, memory and counters."""
        with self._lock:
            versions = [self._models[n] for n in sorted(self._models)]
        return [v.status() for v in versions]

    def close(self) -> None:
        for name in self.names():
            self.unload(name)

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

    # -- internals ---------------------------------------------------------------
    def _acquire(self, name: str) -> ModelVersion:
        """Lease the current version of ``name`` under the lock that swap and unload
        take to replace it, so no version is retired between lookup and lease."""
        with self._lock:
            version = self._models.get(name)
            if version is None:
                raise ModelNotFoundError(name, sorted(self._models))
            version.lease()
            return version

    def _current(self, name: str) -> ModelVersion:
        with self._lock:
            version = self._models.get(name)
        if version is None:
            raise ModelNotFoundError(name, self.names())
        return version

    def _replace(self, name: str, spec: ModelSpec) -> ModelHandle:
        with self._lock:
            number = self._numbers.get(name, 0) + 1
            self._numbers[name] = number
        version = ModelVersion(name=name, number=number, spec=spec)
        self.plugins.notify("model_load_started", name=name, version=number, spec=spec)
        log.info("model.load_started", model=name, version=number, source=spec.source, backend=spec.backend)
        started = time.perf_counter()
        try:
            with self._load_lock:
                self._build(version)
        except Exception as error:
            version.state = State.FAILED
            version.close()
            log.error("model.load_failed", model=name, version=number, error=str(error))
            self.plugins.notify("model_load_failed", name=name, version=number, spec=spec, error=error)
            if isinstance(error, LlmkError):
                raise
            raise ModelLoadError(name, repr(error)) from error
        version.load_seconds = time.perf_counter() - started
        version.loaded_at = time.time()
        version.state = State.READY
        with self._lock:
            old = self._models.get(name)
            self._models[name] = version
        log.info("model.loaded", model=name, version=number, backend=version.backend, device=version.device,
                 seconds=round(version.load_seconds, 3))
        self.plugins.notify("model_loaded", name=name, version=number, spec=spec, backend=version.backend,
                            device=version.device, seconds=version.load_seconds)
        if old is not None:
            self._retire(old, None)
        return ModelHandle(self, name)

    def _retire(self, version: ModelVersion, timeout: float | None) -> None:
        version.state = State.DRAINING
        if not version.wait_idle(self.drain_timeout if timeout is None else timeout):
            log.warning("model.drain_timeout", model=version.name, version=version.number,
                        active_requests=version.leases)
        version.state = State.UNLOADING
        version.close()
        version.state = State.UNLOADED
        log.info("model.unloaded", model=version.name, version=version.number)
        self.plugins.notify("model_unloaded", name=version.name, version=version.number)

    def _build(self, version: ModelVersion) -> None:
        spec = version.spec
        # Names and options first: a typo must not cost a model conversion.
        if spec.backend != "auto":
            self.plugins.backends.get(spec.backend)
        passes = [self._resolve_pass(p) for p in spec.passes]
        source = self.plugins.resolve_source(spec.source, self.cache)
        backend_cls, device = self._choose_backend(spec, source.task)
        backend = backend_cls()
        options = _backend_options(backend_cls, spec.options)
        dtype = spec.dtype if spec.dtype != "auto" else ("fp32" if device == "cpu" else "bf16")
        version.backend, version.device, version.dtype = backend_cls.name, device, dtype
        base, version.artifact, built = self._prepare(source, backend, dtype, passes)
        runner = backend.load(version.artifact, device=device, dtype=dtype, options=options, cache=self.cache)
        version.engine = Engine(runner, Tokenizer(source.tokenizer_dir, source=spec.source))
        if built and spec.max_ppl_increase is not None:
            try:
                version.quality = self._quality_gate(version, base, backend, device, dtype, options)
            except QualityGateError:
                for path in built:  # never leave a refused artifact behind as a good cache entry
                    self.cache.remove(path)
                raise
        version.state = State.WARMING
        self._warm_up(version)

    def _resolve_pass(self, pass_spec: PassSpec) -> tuple[Registered[Optimizer], PassOptions]:
        registered = self.plugins.passes.get(pass_spec.name)
        reason = registered.cls.availability()
        if reason:
            hint = f"; install it with: {registered.cls.install}" if registered.cls.install else ""
            raise UnsupportedError(f"pass {pass_spec.name!r} is not available: {reason}{hint}")
        return registered, registered.cls.options(pass_spec.options)

    def _choose_backend(self, spec: ModelSpec, task: str) -> tuple[type[Backend], str]:
        registry = self.plugins.backends
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
            candidates.append((-cls.speed_rank[device.split(":")[0]], cls.name, cls, device))
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
        built: list[Path] = []
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
                  backend: Backend, built: list[Path], key_parts: tuple[Any, ...]) -> Artifact:
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
        path = self.cache.build(
            "passes", f"{optimizer_cls.name}-{key}",
            lambda out: optimizer_cls().apply(artifact, out, backend=backend.name, options=options),
            describe=f"pass {optimizer_cls.name} on {backend.name}",
        )
        built.append(path)
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
                baseline = Engine(baseline_runner, engine.tokenizer).perplexity(text)
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

    def _warm_up(self, version: ModelVersion) -> None:
        """Run one real request through the new version before it may serve."""
        engine = version.engine
        assert engine is not None
        if engine.runner.task == "embed":
            engine.embed([WARMUP_PROMPT])
        else:
            # Two tokens: one prefill and one decode step, the two graphs a request runs.
            engine.generate([engine.prompt_ids(WARMUP_PROMPT)], [SamplingParams(max_tokens=2, temperature=0.0)])


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
