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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

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
    def rank(cls, device_type: str, source_format: str) -> int:
        """``speed_rank`` for a source in ``source_format`` (``hf``, ``gguf``): a backend
        that serves some formats as they are and converts others may rank them apart."""
        return cls.speed_rank[device_type]

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

    def kv_bytes_per_token(self, config_dir: Path, *, dtype: str, options: BackendOptions) -> int:
        """KV cache bytes of one token position, read from the model's ``config.json``
        before loading it (the kernel budgets the cache with it). The default stores
        keys and values in ``dtype``; override it when the runtime picks its own type."""
        from llmk.kv import config_bytes_per_token

        return config_bytes_per_token(config_dir, dtype)

    @abstractmethod
    def load(self, artifact: Artifact, *, device: str, dtype: str, options: BackendOptions, cache: Cache) -> Runner:
        """Load ``artifact`` on ``device`` (a concrete one such as ``cpu`` or ``cuda:0``).

        ``cache`` is the kernel's cache, for what a runtime can prepare once and
        reuse (optimized graphs, compiled blobs) with ``cache.build(...)``.
        """


@dataclass(frozen=True)
class KVLayout:
    """How a generation runner stores its KV cache. The engine's KV manager
    (``llmk.kv``) sizes the cache from it and hands out its blocks.

    The cache is ``num_blocks`` blocks of ``block_size`` token positions. A
    *paged* runner (``contiguous=False``) can put any block anywhere in a
    sequence: sequences that share a prompt prefix share its blocks. A
    *contiguous* runner keeps each sequence in one slot, a run of
    ``blocks_per_slot`` consecutive blocks (slot ``s`` holds blocks
    ``s * blocks_per_slot`` onwards, position ``p`` lives in block
    ``s * blocks_per_slot + p // block_size``); a prefix cached in another slot
    is copied (``Runner.copy_blocks``) rather than shared.
    """

    #: KV bytes of one token position, all layers, keys and values.
    bytes_per_token: int
    #: Token positions per block; fixed by some runtimes (OpenVINO's CPU paged attention: 32).
    block_size: int = 16
    #: Each sequence lives in one slot of consecutive blocks (see above).
    contiguous: bool = False
    #: Positions the prefix cache keeps once no running sequence uses them (``None``: as
    #: many as the KV budget holds). A runtime whose every step reads every cell in use
    #: (llama.cpp's unified cache: attention spans the cells up to the highest one used)
    #: pays for idle cache on every step, and bounds it.
    max_cached_tokens: int | None = None

    def blocks_per_slot(self, max_context: int) -> int:
        return -(-max_context // self.block_size)


@dataclass
class SequenceStep:
    """What one sequence computes in an engine step: ``tokens`` at positions
    ``start, start + 1, ...``, attending to the ``start`` positions already in its
    cache and causally to each other.

    Runners keep no state per sequence between steps: every step names the
    positions and the blocks. That is what lets the engine join and drop
    sequences without touching the others, share prefix blocks, and roll a
    sequence back (speculative decoding) by only lowering its next ``start``:
    positions at and after ``start`` are overwritten before they are read.
    """

    #: The sequence's slot: unique among the sequences in flight, ``< num_slots``.
    slot: int
    #: New token ids (a prompt chunk, the last sampled token, or that token plus drafts).
    tokens: list[int]
    #: Positions already cached; ``tokens[i]`` is at position ``start + i``.
    start: int
    #: Block table: block ``blocks[p // block_size]`` holds position ``p``, for every
    #: position up to ``start + len(tokens)``.
    blocks: list[int]
    #: Logits wanted for this many of the last positions: 0 (a prompt chunk that
    #: does not end the prompt), 1 (the next token), or more (checking drafts).
    logits: int = 1
    #: The LoRA adapter these tokens run with (what ``Runner.load_adapter`` returned),
    #: or ``None`` for the model alone; rows of different adapters share a step.
    adapter: Any = None


class Runner(ABC):
    """A model loaded by a backend on a device.

    Generation runners implement the step contract (v2): ``kv_layout``,
    ``allocate_cache`` and ``forward``, plus ``logits`` for scoring. Encoder
    runners implement ``encode``. All arrays are NumPy on the host; logits and
    hidden states are float32.
    """

    task: Task
    device: str
    #: Longest sequence (prompt + generated tokens) the model accepts.
    max_context: int = 2048
    #: The KV cache's layout; ``None`` for encoders.
    kv_layout: KVLayout | None = None
    #: What one more token adds to a one-sequence decode step, as a share of that step:
    #: speculative decoding drafts only what pays for it. The default is an upper bound of
    #: what ``bench/draft_cost.py`` measured on SmolLM2 on the CPU (onnxruntime int4 0.22-0.26,
    #: openvino int4 <= 0.13, torch fp32 <= 0.07); a runtime far from it says so (llamacpp: 0.45).
    draft_token_cost: float = 0.25

    # -- the step contract ---------------------------------------------------------
    def allocate_cache(self, num_blocks: int, num_slots: int, capacity_blocks: int | None = None) -> None:
        """Create the KV cache: ``num_blocks`` blocks of ``kv_layout.block_size``
        positions, for at most ``num_slots`` sequences in flight, of which at most
        ``capacity_blocks`` (default all) hold data at once — fewer than
        ``num_blocks`` in a contiguous layout, whose slots can each reach the whole
        context; a runtime that allocates positions itself sizes its cache by it.
        Called once, before the first ``forward``; its memory counts in the kernel's
        budget."""
        raise UnsupportedError(f"{type(self).__name__} does not generate")

    def forward(self, steps: list[SequenceStep]) -> np.ndarray:
        """Run one engine step: write each step's keys and values at its positions
        and return the logits it asked for, ``[sum(step.logits), vocab]``, in step
        order (within a step, positions in order). A step may mix prompt chunks and
        single decode tokens of different sequences; the result for each sequence
        must be what it would get alone (the engine checks greedy parity)."""
        raise UnsupportedError(f"{type(self).__name__} does not generate")

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the cached keys and values of block ``src`` into block ``dst``, for
        each ``(src, dst)``: how a contiguous runner reuses a prefix cached in another
        slot. Paged runners share blocks instead and never get this call."""
        raise UnsupportedError(f"{type(self).__name__} cannot copy cache blocks")

    def load_adapter(self, path: Path) -> Any:
        """Load a LoRA adapter (a peft adapter directory) beside the model's weights and
        return what ``SequenceStep.adapter`` passes back: a runner that implements this
        applies each step's adapters per row, so requests for different adapters share
        one batch. Runners that cannot (compiled graphs) leave it: the kernel then
        serves each adapter as a merged variant of its own."""
        raise UnsupportedError(f"{type(self).__name__} cannot apply adapters per request")

    def release_blocks(self, blocks: list[int]) -> None:
        """``blocks`` hold nothing worth keeping: a runner may give their memory back
        to the OS (contiguous caches committed lazily). Optional."""

    # -- scoring and embedding -------------------------------------------------------
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits for every position of one sequence, ``[len, vocab]``, without
        touching the serving cache. A runner that implements ``load_adapter`` also
        takes ``adapter=`` (what it returned), to score with that adapter."""
        raise UnsupportedError(f"{type(self).__name__} does not score text")

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Last hidden states ``[batch, len, hidden]`` of a padded batch."""
        raise UnsupportedError(f"{type(self).__name__} does not embed")

    def memory_bytes(self) -> int:
        """Memory the loaded model holds: weights and runtime buffers. The KV cache
        is counted by the engine, from its capacity (``allocate_cache`` may reserve
        more address space than the budget lets it fill)."""
        return 0

    def close(self) -> None:
        """Release the model's memory. The runner is not used afterwards."""
