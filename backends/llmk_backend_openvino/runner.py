"""Token ids in, logits out, on a compiled OpenVINO model with paged attention.

The KV cache is a pair of tensors per layer, ``[blocks, kv_heads, block_size,
head_dim]``, created once by ``allocate_cache`` and bound to the serving infer
request; OpenVINO's paged attention reads and writes them in place, so no cache
ever crosses into Python. Each ``forward`` packs its steps into one flat call (see
``paged.py`` for the inputs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from llmk.artifact import Artifact
from llmk.backend import KVLayout, Runner, SequenceStep
from llmk.errors import OptionsError, UnsupportedError
from llmk.logs import get_logger
from llmk_backend_openvino.backend import OpenVINOOptions
from llmk_backend_openvino.paged import LOGITS_ROWS, read_paged

log = get_logger("llmk.backend.openvino")

#: Positions per call when scoring a long text: bounds the activations of one call.
SCORE_CHUNK = 1024

_core: ov.Core | None = None


def core() -> ov.Core:
    global _core
    if _core is None:
        _core = ov.Core()
    return _core


def compile_model(path: Path, dtype: str, options: OpenVINOOptions, cache_dir: Path | None = None) -> ov.CompiledModel:
    config = compile_config(dtype, options)
    if cache_dir is not None:
        config.update({"CACHE_DIR": str(cache_dir), "CACHE_MODE": "OPTIMIZE_SIZE"})
    return core().compile_model(str(path), "CPU", config)


def compile_paged(path: Path, dtype: str, options: OpenVINOOptions) -> ov.CompiledModel:
    """The stateful decoder at ``path``, made paged and compiled. Not cached: OpenVINO's
    CPU plugin cannot import a compiled paged model back (see ``paged.py``)."""
    return core().compile_model(read_paged(path, core()), "CPU", compile_config(dtype, options))


def compile_config(dtype: str, options: OpenVINOOptions) -> dict[str, Any]:
    precision = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[dtype]
    kv_precision = precision
    if precision == "bf16" and "BF16" not in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        kv_precision = "f32"  # such a CPU computes in f32, and its paged attention then reads only f32 (or f16)
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": options.performance_hint.upper(),
        # By default the CPU plugin may compute in bf16, store the KV cache in u8
        # and quantize activations on the fly: each is a small error that breaks
        # token parity with the other backends. Keep everything in the asked dtype.
        "INFERENCE_PRECISION_HINT": precision,
        "KV_CACHE_PRECISION": kv_precision,
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
    }
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = options.threads
    return config


@dataclass(frozen=True)
class CacheSpec:
    """The cache inputs of a compiled paged model: names, element type, and the
    shape of one block of each (``[kv_heads, block_size, head_dim]``)."""

    names: tuple[str, ...]
    element: ov.Type
    block_shape: tuple[int, ...]

    @classmethod
    def of(cls, compiled: ov.CompiledModel) -> CacheSpec:
        ports = [p for p in compiled.inputs if p.get_any_name().startswith(("key_cache.", "value_cache."))]
        if not ports:
            raise UnsupportedError("openvino: the compiled model has no paged KV cache inputs")
        shapes = {str(p.get_partial_shape()) for p in ports}
        elements = {p.get_element_type().get_type_name() for p in ports}
        block = list(ports[0].get_partial_shape())[1:]
        if len(shapes) != 1 or len(elements) != 1 or any(d.is_dynamic for d in block):
            # Every layer alike is what one block table for all layers assumes.
            raise UnsupportedError(f"openvino: KV cache inputs differ between layers or are dynamic: {shapes}")
        return cls(tuple(p.get_any_name() for p in ports), ports[0].get_element_type(),
                   tuple(d.get_length() for d in block))

    @property
    def block_size(self) -> int:
        return self.block_shape[1]

    @property
    def bytes_per_block(self) -> int:
        return len(self.names) * int(np.prod(self.block_shape)) * self.element.size

    def allocate(self, request: ov.InferRequest, num_blocks: int) -> int:
        """Bind fresh cache tensors of ``num_blocks`` blocks to ``request``; returns their bytes."""
        shape = ov.Shape([num_blocks, *self.block_shape])
        for name in self.names:
            request.set_tensor(name, ov.Tensor(self.element, shape))
        return num_blocks * self.bytes_per_block


def pack(steps: list[SequenceStep], block_size: int, num_blocks: int) -> dict[str, np.ndarray]:
    """The paged model's inputs for ``steps``: their tokens in one flat run. The block
    tables are checked: paged attention writes wherever they point."""
    lengths = np.array([len(s.tokens) for s in steps], dtype=np.int64)
    starts = np.array([s.start for s in steps], dtype=np.int64)
    if not lengths.all():
        raise OptionsError("forward", "a SequenceStep has no tokens")
    ends = starts + lengths
    used = -(-ends // block_size)  # blocks holding positions [0, end)
    if any(len(s.blocks) < n for s, n in zip(steps, used, strict=True)):
        raise OptionsError("forward", "a SequenceStep's block table does not cover its positions")
    if any(not 0 <= s.logits <= len(s.tokens) for s in steps):
        raise OptionsError("forward", "a SequenceStep asks for more logits than it has tokens")
    tables = np.fromiter((b for s, n in zip(steps, used, strict=True) for b in s.blocks[:n]), dtype=np.int64,
                         count=int(used.sum()))
    if tables.size and not 0 <= tables.min() <= tables.max() < num_blocks:
        raise OptionsError("forward", f"a SequenceStep names a block outside the cache's {num_blocks}")
    begins = np.concatenate([[0], np.cumsum(lengths)])
    rows = [np.arange(b - s.logits, b) for s, b in zip(steps, begins[1:], strict=True) if s.logits]
    return {
        "input_ids": np.fromiter((t for s in steps for t in s.tokens), dtype=np.int64, count=int(begins[-1])),
        "position_ids": np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)]),
        "past_lens": starts.astype(np.int32),
        "subsequence_begins": begins.astype(np.int32),
        "block_indices": tables.astype(np.int32),
        "block_indices_begins": np.concatenate([[0], np.cumsum(used)]).astype(np.int32),
        "max_context_len": np.array(ends.max(), dtype=np.int32),
        LOGITS_ROWS: np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
    }


class OpenVINORunner(Runner):
    def __init__(self, compiled: ov.CompiledModel, artifact: Artifact, device: str):
        meta = json.loads((artifact.path / "llmk-openvino.json").read_text())
        self.compiled = compiled
        self.task = meta["task"]
        self.device = device
        self.max_context = meta["max_context"]
        self._weights_bytes = sum(f.stat().st_size for f in artifact.path.glob("model.bin"))
        self._request: ov.InferRequest | None = None
        self._num_blocks = self._cache_bytes = 0
        self._spec: CacheSpec | None = None
        if self.task == "generate":
            self._spec = CacheSpec.of(compiled)
            self.kv_layout = KVLayout(bytes_per_token=self._spec.bytes_per_block // self._spec.block_size,
                                      block_size=self._spec.block_size, contiguous=False)

    @property
    def spec(self) -> CacheSpec:
        if self._spec is None:
            raise UnsupportedError("this model embeds text; it has no KV cache")
        return self._spec

    # -- the step contract ---------------------------------------------------------
    def allocate_cache(self, num_blocks: int, num_slots: int, capacity_blocks: int | None = None) -> None:
        # Paged attention needs nothing per slot: every step names its blocks.
        request = self.compiled.create_infer_request()
        self._cache_bytes = self.spec.allocate(request, num_blocks)
        self._request, self._num_blocks = request, num_blocks
        log.info("openvino.cache_allocated", blocks=num_blocks, block_size=self.spec.block_size,
                 bytes=self._cache_bytes)

    def forward(self, steps: list[SequenceStep]) -> np.ndarray:
        if self._request is None:
            raise UnsupportedError("forward before allocate_cache")
        return self._run(self._request, pack(steps, self.spec.block_size, self._num_blocks))

    @staticmethod
    def _run(request: ov.InferRequest, inputs: dict[str, np.ndarray]) -> np.ndarray:
        request.infer(inputs)
        # The output tensor is the request's own buffer, reused by the next call: copy it.
        return np.array(request.get_tensor("logits").data, dtype=np.float32)

    # -- scoring and embedding -------------------------------------------------------
    def logits(self, token_ids: list[int]) -> np.ndarray:
        # A request of its own with a cache just big enough, dropped afterwards: scoring
        # never touches the serving cache and holds no memory between calls.
        block = self.spec.block_size
        blocks = list(range(-(-len(token_ids) // block)))
        request = self.compiled.create_infer_request()
        self.spec.allocate(request, len(blocks))
        parts = []
        for start in range(0, len(token_ids), SCORE_CHUNK):
            chunk = token_ids[start:start + SCORE_CHUNK]
            step = SequenceStep(0, chunk, start, blocks, len(chunk))
            parts.append(self._run(request, pack([step], block, len(blocks))))
        return np.concatenate(parts)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        request = self.compiled.create_infer_request()
        request.infer({"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    def memory_bytes(self) -> int:
        return self._weights_bytes  # the engine counts the KV cache, at its capacity

    def close(self) -> None:
        self._request = None
        self._num_blocks = self._cache_bytes = 0
        self.compiled = None
