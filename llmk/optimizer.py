"""The ``Optimizer`` interface: an optimization pass (quantize, prune, fuse...).

A pass reads one artifact and writes a new one into a fresh directory; it never
touches the artifact that may be serving, which is what makes hot-swap and
rollback safe. The kernel caches each output, keyed by the input's digest, the
pass, its options and the backend's runtime versions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from llmk.backend import missing_modules
from llmk.errors import OptionsError, UnknownNameError, format_validation_error

if TYPE_CHECKING:
    from llmk.artifact import Artifact


class PassOptions(BaseModel):
    """Base of a pass's options; each pass nests a subclass as ``Options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Optimizer(ABC):
    """A pass plugin. Subclass it, set the class attributes, implement ``apply``."""

    #: Unique name users put in ``passes=[...]``.
    name: ClassVar[str]
    #: Bump when the pass writes different output for the same options: it is part
    #: of the cache key, so cached outputs of the old code are not reused.
    version: ClassVar[str] = "1"
    #: Backends whose artifacts this pass can transform.
    backends: ClassVar[frozenset[str]] = frozenset()
    #: Backends that already do what this pass does, each with how; the kernel
    #: skips the pass there (and logs why) instead of refusing the pipeline.
    native: ClassVar[dict[str, str]] = {}
    #: "backend": runs on the backend's artifact (after export). "source": runs on the
    #: Hugging Face source before any export, so one output serves every backend; such
    #: passes come first in a pipeline.
    stage: ClassVar[Literal["source", "backend"]] = "backend"
    #: Importable modules the pass needs, and the install line when they are missing.
    requires: ClassVar[tuple[str, ...]] = ()
    install: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    #: Named option sets, selected with ``preset=NAME``; explicit options win.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def availability(cls) -> str | None:
        """``None`` when usable here, else the reason (without importing anything)."""
        return missing_modules(cls.requires)

    @classmethod
    def options(cls, raw: dict[str, Any]) -> PassOptions:
        """Validate ``raw`` (after expanding ``preset``), naming the pass on error."""
        raw = dict(raw)
        preset = raw.pop("preset", None)
        if preset is not None:
            if preset not in cls.presets:
                raise UnknownNameError(f"preset of pass {cls.name!r}", str(preset), cls.presets)
            raw = {**cls.presets[preset], **raw}
        try:
            return cls.Options.model_validate(raw)
        except ValidationError as error:
            raise OptionsError(f"pass {cls.name!r}", format_validation_error(error)) from None

    @abstractmethod
    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: PassOptions) -> None:
        """Write the optimized model into the empty directory ``out_dir``, in
        ``artifact.format``. Raise ``LlmkError`` subclasses on failure."""
