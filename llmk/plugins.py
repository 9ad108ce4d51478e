"""Plugin discovery and the one typed facade over the hooks.

Each ``Kernel`` builds its own ``Plugins`` (and pluggy manager): nothing is
loaded at import time and two kernels in one process do not share plugins.
Operators control what loads: ``disable`` blocks plugins by entry-point name
(``LLMK_DISABLE_PLUGINS=a,b``); ``autoload=False`` (``LLMK_DISABLE_PLUGIN_AUTOLOAD=1``)
loads only the plugins that ship with llmk itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

import pluggy

from llmk import hookspecs
from llmk.artifact import Artifact
from llmk.backend import Backend
from llmk.cache import Cache
from llmk.errors import DuplicateNameError, LlmkError, PluginError, SourceError, UnknownNameError
from llmk.logs import get_logger
from llmk.optimizer import Optimizer

log = get_logger("llmk.plugins")

ENTRY_POINT_GROUP = "llmk"
BUILTIN_DISTRIBUTION = "llmk"

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from, for ``llmk plugins`` and error messages."""

    name: str
    package: str
    version: str
    builtin: bool


@dataclass(frozen=True)
class Registered(Generic[T]):
    cls: type[T]
    plugin: PluginInfo


class Registry(Generic[T]):
    """What ``register_backends(register)`` and ``register_passes(register)`` receive."""

    def __init__(self, kind: str, base: type[T]):
        self.kind = kind
        self.base = base
        self.items: dict[str, Registered[T]] = {}
        self._plugin: PluginInfo | None = None

    def add(self, cls: type[T]) -> None:
        """Register ``cls`` under ``cls.name``."""
        plugin = self._plugin or PluginInfo("<unknown>", "<unknown>", "", False)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(plugin.name, f"registered {cls!r}, which is not a {self.base.__name__} subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(plugin.name, f"{cls.__name__} has no `name`")
        if name in self.items:
            raise DuplicateNameError(self.kind, name, self.items[name].plugin.name, plugin.name)
        self.items[name] = Registered(cls, plugin)

    def get(self, name: str) -> Registered[T]:
        try:
            return self.items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.items) from None


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


class Plugins:
    """The kernel's plugins: discovery, registries and every hook call."""

    def __init__(
        self,
        *,
        disable: Iterable[str] = (),
        autoload: bool | None = None,
        plugins: Iterable[Any] = (),
    ):
        if autoload is None:
            autoload = os.environ.get("LLMK_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0", "false")
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.disabled = sorted({*disable, *_env_list("LLMK_DISABLE_PLUGINS")})
        for name in self.disabled:
            self.pm.set_blocked(name)
        self._load_entry_points(autoload)
        for plugin in plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            self._register(plugin, PluginInfo(name, "<in-process>", "", False))
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            raise PluginError(self.pm.get_name(error.plugin) or str(error.plugin), str(error)) from None
        self.backends: Registry[Backend] = self._collect("backend", Backend, "register_backends")
        self.passes: Registry[Optimizer] = self._collect("pass", Optimizer, "register_passes")

    def _load_entry_points(self, autoload: bool) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            package = dist.name if dist else "<unknown>"
            builtin = package == BUILTIN_DISTRIBUTION
            if self.pm.is_blocked(ep.name) or (not autoload and not builtin):
                continue
            seen = self.infos.get(ep.name)
            if seen is not None:
                if seen.package == package:
                    continue  # the same distribution found twice on sys.path
                raise DuplicateNameError("plugin", ep.name, seen.package, package)
            info = PluginInfo(ep.name, package, dist.version if dist else "", builtin)
            try:
                module = ep.load()
            except Exception as error:
                raise PluginError(
                    ep.name,
                    f"failed to import {ep.value!r} from package {package!r}: {error!r}; "
                    f"disable it with LLMK_DISABLE_PLUGINS={ep.name}",
                ) from error
            self._register(module, info)

    def _register(self, plugin: Any, info: PluginInfo) -> None:
        try:
            self.pm.register(plugin, name=info.name)
        except (ValueError, pluggy.PluginValidationError) as error:
            raise PluginError(info.name, str(error)) from None
        self.infos[info.name] = info

    def _impls(self, hook_name: str) -> list[tuple[PluginInfo, Any]]:
        """Implementations in pluggy's call order, with the plugin each came from."""
        hook = getattr(self.pm.hook, hook_name)
        found = []
        for impl in reversed(hook.get_hookimpls()):
            info = self.infos.get(impl.plugin_name, PluginInfo(impl.plugin_name, "<unknown>", "", False))
            found.append((info, impl.function))
        return found

    def _collect(self, kind: str, base: type[T], hook_name: str) -> Registry[T]:
        registry: Registry[T] = Registry(kind, base)
        for info, function in self._impls(hook_name):
            registry._plugin = info
            try:
                function(register=registry)
            except LlmkError:
                raise
            except Exception as error:
                raise PluginError(info.name, f"{hook_name} failed: {error!r}") from error
        registry._plugin = None
        return registry

    # -- decision hooks ----------------------------------------------------
    def resolve_source(self, source: str, cache: Cache) -> Artifact:
        try:
            artifact = self.pm.hook.resolve_source(source=source, cache=cache)
        except LlmkError:
            raise
        except Exception as error:
            raise SourceError(source, f"{error!r}") from error
        if artifact is None:
            raise SourceError(
                source, "not understood: expected builtin:NAME, a model directory, a .gguf file, "
                "or a scheme a source plugin provides"
            )
        return artifact

    # -- observer hooks ----------------------------------------------------
    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook plugin by plugin; a failure is logged naming the
        plugin and does not stop the others or the kernel."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            args = {name: kwargs[name] for name in impl.argnames}
            try:
                impl.function(**args)
            except Exception as error:
                log.error("plugin.hook_failed", plugin=impl.plugin_name, hook=hook_name, error=repr(error))
