"""The typed errors llmk raises.

Library code raises these and never prints; the CLI and the HTTP layer turn them
into messages (and status codes) at the boundary. Every error names what failed.
"""

from __future__ import annotations

from collections.abc import Iterable


class LlmkError(Exception):
    """Base class of every error llmk raises on purpose."""


class PluginError(LlmkError):
    """A plugin failed to import, register or run."""

    def __init__(self, plugin: str, problem: str):
        self.plugin = plugin
        self.problem = problem
        super().__init__(f"plugin {plugin!r}: {problem}")


class UnknownNameError(LlmkError, LookupError):
    """A backend, pass, model or preset name that nothing provides."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        listing = ", ".join(self.known) if self.known else "none"
        super().__init__(f"unknown {kind} {name!r}; known: {listing}")


class DuplicateNameError(LlmkError):
    """Two plugins register the same name; llmk never renames silently."""

    def __init__(self, kind: str, name: str, first: str, second: str):
        self.kind, self.name, self.first, self.second = kind, name, first, second
        super().__init__(
            f"{kind} {name!r} is registered by both plugin {first!r} and plugin {second!r}; "
            f"disable one of them (LLMK_DISABLE_PLUGINS={second})"
        )


class BackendUnavailableError(LlmkError):
    """A backend whose runtime is not installed, or a device it cannot use."""

    def __init__(self, backend: str, reason: str, install: str | None = None):
        self.backend, self.reason, self.install = backend, reason, install
        hint = f"; install it with: {install}" if install else ""
        super().__init__(f"backend {backend!r} is not available: {reason}{hint}")


class RuntimeFailure(LlmkError):
    """A backend's runtime failed an operation it accepted (out of cache cells, an
    internal error); the message names the runtime and the operation."""

    def __init__(self, backend: str, problem: str):
        self.backend, self.problem = backend, problem
        super().__init__(f"backend {backend!r}: {problem}")


class SourceError(LlmkError):
    """A model source that is missing, truncated, corrupt or of an unknown kind."""

    def __init__(self, source: str, problem: str):
        self.source, self.problem = source, problem
        super().__init__(f"model source {source!r}: {problem}")


class OptionsError(LlmkError, ValueError):
    """Options that fail validation; `what` names the thing they were for."""

    def __init__(self, what: str, problem: str):
        self.what, self.problem = what, problem
        super().__init__(f"invalid options for {what}: {problem}")


class UnsupportedError(LlmkError):
    """A call the model or backend cannot serve (e.g. `embed` on a chat model)."""


class ModelNotFoundError(UnknownNameError):
    """No model is loaded under that name."""

    def __init__(self, name: str, known: Iterable[str]):
        super().__init__("model", name, known)


class ModelLoadError(LlmkError):
    """Loading, warming up or health-checking a model version failed."""

    def __init__(self, model: str, problem: str):
        self.model, self.problem = model, problem
        super().__init__(f"model {model!r} failed to load: {problem}")


class ModelNotReadyError(LlmkError):
    """A request waited for a model that is loading, longer than it may."""

    def __init__(self, model: str, waited: float):
        self.model, self.waited = model, waited
        super().__init__(f"model {model!r} is still loading after {waited:.1f}s")


class HealthCheckError(ModelLoadError):
    """A loaded version failed its warm-up request or returned unusable output."""


class MemoryBudgetError(LlmkError):
    """A model does not fit in the kernel's memory budget, even after evicting
    every idle model that may be evicted."""

    def __init__(self, model: str, needed: int, budget: int, used: int, evictable: int):
        from llmk.memory import format_size

        self.model, self.needed, self.budget, self.used, self.evictable = model, needed, budget, used, evictable
        super().__init__(
            f"model {model!r} needs about {format_size(needed)} but the memory budget is {format_size(budget)} "
            f"with {format_size(max(0, budget - used))} free, and evicting every idle, unpinned model past its "
            f"keep-alive would free only {format_size(evictable)} more; unload a model or raise memory_budget"
        )


class QualityGateError(LlmkError):
    """An optimized artifact lost more quality than its pipeline allows."""

    def __init__(self, pipeline: str, baseline: float, optimized: float, limit: float):
        self.pipeline, self.baseline, self.optimized, self.limit = pipeline, baseline, optimized, limit
        increase = optimized / baseline - 1.0
        super().__init__(
            f"passes {pipeline!r} raise perplexity by {increase:+.2%} ({baseline:.3f} -> {optimized:.3f}), "
            f"more than max_ppl_increase={limit:.2%}; the artifact was discarded"
        )


def format_validation_error(error: Exception) -> str:
    """One line per pydantic error: `key.path: reason`."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return str(error)
    parts = []
    for item in errors():
        where = ".".join(str(p) for p in item.get("loc", ())) or "(root)"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)
