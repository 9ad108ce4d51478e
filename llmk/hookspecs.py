"""Every hook llmk calls, in one place: this module is the plugin reference.

A plugin is a module or object with functions named like the specs below, each
decorated with ``@llmk.hookimpl``. It is found through the ``llmk`` entry-point
group (built-ins and third parties alike) or passed to ``Kernel(plugins=[...])``.

Rules the kernel keeps so that plugins stay compatible:
- hooks only grow by adding named arguments; an implementation takes the subset
  it needs (pluggy matches arguments by name);
- built-in implementations of decision hooks are ``trylast=True`` so that any
  third-party implementation is asked first;
- observer hooks (``model_*``, ``request_finished``) are called plugin by plugin: one that raises is
  reported as a ``plugin.hook_failed`` event naming the plugin and the others still run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from llmk.artifact import Artifact
    from llmk.cache import Cache
    from llmk.monitor import RequestRecord
    from llmk.plugins import Registry
    from llmk.spec import ModelSpec

PROJECT = "llmk"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Registry) -> None:
    """Register backend classes: ``register.add(MyBackend)``.

    Called once per plugin when a ``Kernel`` is created. ``MyBackend`` must
    subclass ``llmk.Backend`` and carry a unique ``name``; a name registered by
    two plugins raises ``DuplicateNameError`` naming both. Returns nothing.
    """


@hookspec
def register_passes(register: Registry) -> None:
    """Register optimization passes: ``register.add(MyPass)``.

    Called once per plugin when a ``Kernel`` is created. ``MyPass`` must
    subclass ``llmk.Optimizer`` and carry a unique ``name``; duplicates raise
    ``DuplicateNameError`` naming both plugins. Returns nothing.
    """


@hookspec(firstresult=True)
def resolve_source(source: str, cache: Cache) -> Artifact | None:
    """Turn a source string (``builtin:smollm2``, a path, ``myscheme:...``) into a
    local Hugging Face-format model directory.

    Called on every load, before a backend is chosen. Return an ``Artifact`` of
    format ``hf`` when this plugin understands ``source``, ``None`` to let the next plugin
    try. ``firstresult``: the first non-``None`` answer wins; the built-in
    resolver is ``trylast``. Raise ``SourceError`` for a source you own that is
    missing or corrupt. Conversions belong in ``cache.build(...)`` so that they
    happen once and atomically.
    """


@hookspec
def model_load_started(name: str, version: int, spec: ModelSpec) -> None:
    """Observer: the kernel starts loading ``version`` of model ``name``."""


@hookspec
def model_loaded(
    name: str, version: int, spec: ModelSpec, backend: str, device: str, seconds: float
) -> None:
    """Observer: ``version`` of ``name`` is loaded, warmed up and now serving.

    ``backend`` and ``device`` are the resolved ones (never ``auto``);
    ``seconds`` is the wall time from start to ready.
    """


@hookspec
def model_load_failed(name: str, version: int, spec: ModelSpec, error: Exception) -> None:
    """Observer: loading ``version`` of ``name`` failed with ``error`` (already
    raised to the caller). Whatever served before keeps serving."""


@hookspec
def model_unloaded(name: str, version: int) -> None:
    """Observer: ``version`` of ``name`` has drained and its memory is released."""


@hookspec
def model_state_changed(name: str, version: int, state: str, previous: str, detail: dict[str, Any]) -> None:
    """Observer: ``version`` of ``name`` moved from ``previous`` to ``state``.

    States: loading, warming, ready, draining, unloading, unloaded, failed
    (``llmk.State``). ``detail`` says why or how: on ``ready`` the load's
    ``seconds``, ``mode`` ("new", "alongside", "replace") and ``memory_bytes``;
    on ``draining`` the ``reason`` ("swapped", "replaced", "unload",
    "evicted:memory", "evicted:expired"); on ``failed`` the ``error``. Every
    transition is also logged as the ``model.state_changed`` event.
    """


@hookspec
def model_update(name: str, stage: str, detail: dict[str, Any]) -> None:
    """Observer: a step of a periodic update of ``name`` (its spec's ``update``).

    Stages, in order: ``started`` (``detail["files"]``: the new data files),
    ``tuned`` (the ``adapter`` and the perplexities ``serving_eval``,
    ``candidate_eval``, ``serving_new``, ``candidate_new``), then ``passed`` and
    ``swapped`` (the new ``version``), or ``rejected`` (the ``reason``: the quality
    gate failed), or ``failed`` at any point (the ``error``); after ``rejected``
    or ``failed`` the old version keeps serving. Each is also the
    ``model.update_STAGE`` event.
    """


@hookspec
def model_alert(name: str, version: int, alert: dict[str, Any]) -> None:
    """Observer: an alert rule of the kernel changed state for ``version`` of ``name``.

    ``alert`` has ``metric`` (e.g. ``ttft_p95_seconds``, ``error_rate``, or the
    watchdog's ``engine_stalled_seconds``: the engine has had work and made no
    progress for longer than the kernel's ``stall_timeout``), ``value``,
    ``threshold`` and ``state``: "firing" when the metric crossed above the
    threshold, "resolved" when it fell back. Edge-triggered: one call per
    crossing, not one per request.
    """


@hookspec
def request_finished(name: str, version: int, record: RequestRecord) -> None:
    """Observer: a request to ``version`` of ``name`` has finished (or failed).

    Called once per call of a ``ModelHandle`` method, in the thread that ran it,
    after its figures are counted in ``kernel.status()``. ``record`` holds what
    the request measured: ``tokens_in``, ``tokens_out``, ``queue_wait``,
    ``ttft`` and ``tpot`` (seconds; ``None`` when not measured), ``finish_reason``,
    and ``error``/``rejected``. The daemon's Prometheus metrics are built on it.
    Keep it cheap: it runs on the request path.
    """
