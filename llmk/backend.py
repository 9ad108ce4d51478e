"""The ``Backend`` interface: a runtime that loads an artifact onto a device.

A backend only turns token ids into logits (or hidden states). Tokenizing,
chat templates, sampling, stop sequences, streaming, perplexity and pooling live
in the core (``llmk.generation``), shared by every backend, which is what makes
greedy output token-identical across runtimes and lets one scheduler batch
requests for any of them.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from llmk.errors import UnsupportedError

if TYPE_CHECKING:
    import numpy as np

    from llmk.artifact import Artifact, Task
    from llmk.cache import Cache


def missing_modules(modules: tuple[str, ...]) -> str | None:
    """The reason a plugin cannot run here, found without importing anything."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"missing Python module(s): {', '.join(missing)}" if missing else None


class BackendOptions(BaseModel):
    """Base of a backend's own options; each backend nests a subclass as ``Options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: Files that hold weights, in the formats the built-in backends load.
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".onnx", ".data", ".gguf"})


class Backend(ABC):
    """A runtime plugin. Subclass it, set the class attributes, implement ``load``.

    Capabilities are class attributes so that ``llmk plugins`` and ``auto``
    selection can read them without importing the runtime.
    """

    #: Unique name users pass as ``backend=``.
    name: ClassVar[str]
    #: What artifacts ``load`` accepts; an ``hf`` source is first passed to ``export``.
    artifact_format: ClassVar[str] = "hf"
    #: Tasks this backend serves.
    tasks: ClassVar[frozenset[Task]] = frozenset({"generate", "embed"})
    #: Importable modules the runtime needs, checked by ``availability``.
    requires: ClassVar[tuple[str, ...]] = ()
    #: The exact install line shown when the runtime is missing.
    install: ClassVar[str] = ""
    #: For ``backend="auto"``: higher is faster, per device type ("cpu", "cuda"),
    #: comparable across backends and device types; a device type missing here is
    #: not supported. Measured: see docs/BENCHMARKS.md.
    speed_rank: ClassVar[dict[str, int]] = {"cpu": 0}
    #: Resident memory per byte of weight files once loaded and warmed up (the
    #: runtime's own copies, prepacked weights, arenas): what ``estimate_memory``
    #: multiplies by. Measured: see docs/BENCHMARKS.md; err on the high side.
    memory_factor: ClassVar[float] = 1.2
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    @classmethod
    def availability(cls) -> str | None:
        """``None`` when usable here, else the reason (without importing the runtime)."""
        return missing_modules(cls.requires)

    @classmethod
    def devices(cls) -> list[str]:
        """Devices this backend can use here, best first. May import the runtime."""
        return ["cpu"] if "cpu" in cls.speed_rank else []

    @classmethod
    def versions(cls) -> dict[str, str]:
        """Runtime versions; part of every cache key built by this backend."""
        from importlib.metadata import PackageNotFoundError, version

        found = {}
        for module in cls.requires:
            try:
                found[module] = version(module)
            except PackageNotFoundError:
                found[module] = "unknown"
        return found

    def export(self, source: Artifact, out_dir: Path, *, dtype: str) -> None:
        """Write ``source`` (an ``hf`` artifact) into ``out_dir`` in ``artifact_format``.

        Called only when the formats differ, inside an atomic cache build, so a
        failure or a kill leaves nothing half-written behind.
        """
        raise UnsupportedError(f"backend {self.name!r} cannot export {source.format!r} artifacts")

    def estimate_memory(self, artifact: Artifact, *, device: str, dtype: str, options: BackendOptions) -> int:
        """Bytes the loaded model will hold, estimated before loading it (the
        kernel makes room under its memory budget with this). The default is the
        size of the weight files times ``memory_factor``; override it when loading
        changes the size in other ways (a dtype conversion)."""
        weights = sum(f.stat().st_size for f in artifact.path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        return int(weights * self.memory_factor)

    @abstractmethod
    def load(self, artifact: Artifact, *, device: str, dtype: str, options: BackendOptions, cache: Cache) -> Runner:
        """Load ``artifact`` on ``device`` (a concrete one such as ``cpu`` or ``cuda:0``).

        ``cache`` is the kernel's cache, for what a runtime can prepare once and
        reuse (optimized graphs, compiled blobs) with ``cache.build(...)``.
        """


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask ``[batch, longest]``, padded on the left so
    that every prompt's last token sits in the last column (int64)."""
    import numpy as np

    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


class DecodeState(ABC):
    """A batch of sequences in flight on one runner (its KV cache and positions)."""

    @abstractmethod
    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), dropping finished sequences."""


class Runner(ABC):
    """A model loaded by a backend on a device.

    Generation models implement ``prefill``, ``decode`` and ``logits``; encoder
    models implement ``encode``. All arrays are NumPy, float32, on the host.
    """

    task: Task
    device: str
    #: Longest sequence (prompt + generated tokens) the model accepts.
    max_context: int = 2048

    def prefill(self, prompts: list[list[int]]) -> tuple[DecodeState, np.ndarray]:
        """Run whole prompts (of any lengths) and return the state and the
        logits of each prompt's last token, shape ``[batch, vocab]``."""
        raise UnsupportedError(f"{type(self).__name__} does not generate")

    def decode(self, state: DecodeState, tokens: list[int]) -> np.ndarray:
        """Feed one token per sequence; return the next logits ``[batch, vocab]``."""
        raise UnsupportedError(f"{type(self).__name__} does not generate")

    def merge(self, states: list[DecodeState]) -> DecodeState:
        """One batch holding the rows of ``states`` in order, the shorter caches
        left-padded (and masked) to the longest: how requests prefilled later
        join a batch that is decoding (continuous batching). The states are not
        used afterwards. Optional: without it each prefilled group decodes as its
        own batch."""
        raise UnsupportedError(f"{type(self).__name__} cannot merge batches")

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits for every position of one sequence, ``[len, vocab]``."""
        raise UnsupportedError(f"{type(self).__name__} does not score text")

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Last hidden states ``[batch, len, hidden]`` of a padded batch."""
        raise UnsupportedError(f"{type(self).__name__} does not embed")

    def memory_bytes(self) -> int:
        """Memory the loaded model holds (weights and buffers)."""
        return 0

    def close(self) -> None:
        """Release the model's memory. The runner is not used afterwards."""
