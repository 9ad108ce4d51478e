"""Token ids in, logits out, on an ONNX Runtime session (the step contract).

The decoder graph (``builder.py``) runs on KV buffers bound in place
(``kvcache.py``): a contiguous layout, one slot per sequence. A call binds a
range of slots, right-pads each row's tokens to the longest and leaves the slots
in between idle (``query_seqlens`` 0). An engine step makes one call for all the
sequences that bring a few tokens (decode, draft verification) when their slots
are near each other, and one call per prompt chunk, or per group of chunks of
nearby slots and similar lengths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from llmk.artifact import Artifact
from llmk.backend import KVLayout, Runner, SequenceStep
from llmk.errors import UnsupportedError
from llmk_backend_onnxruntime.backend import OnnxRuntimeOptions
from llmk_backend_onnxruntime.builder import past_names, present_names
from llmk_backend_onnxruntime.kvcache import ITEM_SIZES, Buffers, DeviceBuffers, HostBuffers, Shape

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
BLOCK_SIZE = 16
#: Steps of at most this many tokens (decode, draft verification) share batched calls.
BATCH_TOKENS = 8
#: Idle slots a batched call of short steps may carry between two sequences.
MAX_IDLE_ROWS = 8
#: Prompt chunks of nearby slots share a call while its padded size stays within this
#: factor of their tokens (measured on SmolLM2: eight 256-token chunks in one call take
#: 19% less time than one by one, mostly better-spread attention work), and within
#: MAX_CALL_TOKENS, which bounds the attention op's scratch memory.
MAX_PADDING = 1.25
MAX_CALL_TOKENS = 2048
#: IO bindings kept, one per range of slots.
MAX_BINDINGS = 64


def save_optimized(path: Path, out: Path, level: str) -> None:
    """Write the graph as optimized at ``level`` ("all" is specific to this machine's CPU)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    so.log_severity_level = 3
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def make_session(path: Path, device: str, options: OnnxRuntimeOptions) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION_LEVELS[options.graph_optimization]
    so.log_severity_level = 3
    if options.threads:
        so.intra_op_num_threads = options.threads
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=providers)


def read_meta(artifact: Artifact) -> dict[str, Any]:
    from llmk_backend_onnxruntime.export import META_FILE

    return json.loads((artifact.path / META_FILE).read_text())


def weights_bytes(artifact: Artifact) -> int:
    return sum(f.stat().st_size for f in artifact.path.glob("model.onnx*"))


@dataclass
class _Call:
    """One session call: ``steps`` (indices into the engine step) on slots ``lo..hi-1``."""

    lo: int
    hi: int
    steps: list[int]


class OnnxRuntimeRunner(Runner):
    """A decoder graph with its KV buffers; see the module docstring."""

    task = "generate"

    def __init__(self, session: ort.InferenceSession, artifact: Artifact, device: str, *,
                 device_buffers: bool | None = None):
        meta = read_meta(artifact)
        self.session = session
        self.device = device
        self.max_context = int(meta["max_context"])
        self.vocab = int(meta["vocab"])
        self._dtype = meta["dtype"]
        self._layers, self._kv_heads, self._head_dim = int(meta["layers"]), int(meta["kv_heads"]), int(meta["head_dim"])
        self._pasts, self._presents = past_names(self._layers), present_names(self._layers)
        self.kv_layout = KVLayout(
            bytes_per_token=2 * self._layers * self._kv_heads * self._head_dim * ITEM_SIZES[self._dtype],
            block_size=BLOCK_SIZE, contiguous=True)
        # CUDA keeps the buffers on the device; ``device_buffers=True`` takes that path on the CPU (tests).
        self._device_buffers = device.startswith("cuda") if device_buffers is None else device_buffers
        self._weights_bytes = weights_bytes(artifact)
        self._cache: Buffers | None = None
        self._blocks_per_slot = 0
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}

    # -- the cache -----------------------------------------------------------------
    def _buffers(self, slots: int, capacity: int) -> Buffers:
        shape = Shape(slots, self._kv_heads, capacity, self._head_dim, self._dtype)
        if self._device_buffers:
            return DeviceBuffers(shape, 2 * self._layers, self.device)
        return HostBuffers(shape, 2 * self._layers)

    def allocate_cache(self, num_blocks: int, num_slots: int, capacity_blocks: int | None = None) -> None:
        self._blocks_per_slot = num_blocks // num_slots
        if self._blocks_per_slot < 1:
            raise UnsupportedError(f"a cache of {num_blocks} blocks has no room for {num_slots} slots")
        self._close_cache()
        self._cache = self._buffers(num_slots, self._blocks_per_slot * BLOCK_SIZE)

    @property
    def cache_device(self) -> str | None:
        """Where the KV buffers live (``cpu``, ``cuda:0``); ``None`` before ``allocate_cache``."""
        if self._cache is None:
            return None
        kind, index = self._cache.device
        return kind if kind == "cpu" else f"{kind}:{index}"

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self._require_cache().copy_blocks(pairs, self._blocks_per_slot, BLOCK_SIZE)

    def release_blocks(self, blocks: list[int]) -> None:
        if self._cache is not None:
            self._cache.release_blocks(blocks, self._blocks_per_slot, BLOCK_SIZE)

    def _require_cache(self) -> Buffers:
        if self._cache is None:
            raise UnsupportedError("allocate_cache() must be called before forward()")
        return self._cache

    # -- steps ---------------------------------------------------------------------
    def forward(self, steps: list[SequenceStep]) -> np.ndarray:
        cache = self._require_cache()
        limit = self._limit(cache)
        for step in steps:
            if not (len(step.tokens) > 0 and 0 <= step.logits <= len(step.tokens)):
                raise UnsupportedError(f"slot {step.slot}: a step needs tokens, and at most that many logits")
            if step.start + len(step.tokens) > limit:
                raise UnsupportedError(f"slot {step.slot}: {step.start + len(step.tokens)} positions exceed "
                                       f"the cache's {limit}")
        parts: list[np.ndarray | None] = [None] * len(steps)
        for call in self._plan(steps, limit):
            logits = self._run(cache, call.lo, call.hi, [steps[i] for i in call.steps], limit)
            offset = 0
            for i in call.steps:
                parts[i] = logits[offset:offset + steps[i].logits]
                offset += steps[i].logits
        return np.concatenate(parts) if parts else np.zeros((0, self.vocab), np.float32)

    def _limit(self, cache: Buffers) -> int:
        # The rotary tables have ``max_context`` rows; the op refuses a larger bound.
        return min(cache.shape.capacity, self.max_context)

    def _plan(self, steps: list[SequenceStep], limit: int) -> list[_Call]:
        """The session calls for ``steps``: short steps batched over runs of nearby slots;
        long ones (prompt chunks) batched with their slot neighbours when the right
        padding stays small, else alone. A step whose slot cannot take its call's padding
        (near the end of the cache) goes alone."""
        short = sorted((i for i, s in enumerate(steps) if len(s.tokens) <= BATCH_TOKENS), key=lambda i: steps[i].slot)
        long = sorted((i for i, s in enumerate(steps) if len(s.tokens) > BATCH_TOKENS), key=lambda i: steps[i].slot)
        calls: list[_Call] = []
        for group, joins in ((short, self._joins_short), (long, self._joins_long)):
            current: _Call | None = None
            for i in group:
                if current is not None and joins(current, i, steps, limit):
                    current.hi, current.steps = steps[i].slot + 1, [*current.steps, i]
                else:
                    current = _Call(steps[i].slot, steps[i].slot + 1, [i])
                    calls.append(current)
        return calls

    @staticmethod
    def _fits(call: _Call, i: int, steps: list[SequenceStep], limit: int) -> bool:
        """Whether every row of ``call`` plus step ``i`` has room for the padded width
        (GroupQueryAttention needs ``cached + width <= capacity``; an idle row counts one
        cached position)."""
        members = [*call.steps, i]
        width = max(len(steps[j].tokens) for j in members)
        idle = steps[i].slot + 1 - call.lo > len(members)
        return all(steps[j].start + width <= limit for j in members) and (not idle or width < limit)

    def _joins_short(self, call: _Call, i: int, steps: list[SequenceStep], limit: int) -> bool:
        # An idle row costs a few tokens of work; a call of its own costs a pass over the weights.
        return steps[i].slot - call.hi <= MAX_IDLE_ROWS and self._fits(call, i, steps, limit)

    def _joins_long(self, call: _Call, i: int, steps: list[SequenceStep], limit: int) -> bool:
        # Idle rows and right padding cost whole rows of the chunk width here.
        members = [*call.steps, i]
        tokens = sum(len(steps[j].tokens) for j in members)
        padded = (steps[i].slot + 1 - call.lo) * max(len(steps[j].tokens) for j in members)
        return padded <= min(MAX_PADDING * tokens, MAX_CALL_TOKENS) and self._fits(call, i, steps, limit)

    def _run(self, cache: Buffers, lo: int, hi: int, steps: list[SequenceStep], total: int) -> np.ndarray:
        """One session call on slots ``lo..hi-1``; logits of ``steps`` in their order."""
        width = max(len(s.tokens) for s in steps)
        ids = np.zeros((hi - lo, width), np.int64)
        seqlens = np.zeros(hi - lo, np.int32)  # idle rows: one cached position, none read or written
        queries = np.zeros(hi - lo, np.int32)
        rows: list[int] = []
        for step in steps:
            row, n = step.slot - lo, len(step.tokens)
            ids[row, :n] = step.tokens
            seqlens[row], queries[row] = step.start + n - 1, n
            rows += range(row * width + n - step.logits, row * width + n)
        return self._session_run(cache, lo, hi, ids, seqlens, queries, np.asarray(rows, np.int64), total)

    def _session_run(self, cache: Buffers, lo: int, hi: int, ids: np.ndarray, seqlens: np.ndarray,
                     queries: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray:
        binding = self._binding(cache, lo, hi)
        # Into an array of ours: reading outputs back would wrap every present buffer too.
        logits = np.empty((len(rows), self.vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        binding.bind_cpu_input("query_seqlens", queries)
        binding.bind_cpu_input("logits_rows", rows)
        self.session.run_with_iobinding(binding)
        return logits

    def _binding(self, cache: Buffers, lo: int, hi: int) -> ort.IOBinding:
        """An IO binding with slots ``lo..hi-1`` bound; kept per range for the serving
        cache (binding two pointers per layer is most of a decode step's Python time)."""
        serving = cache is self._cache
        binding = self._bindings.get((lo, hi)) if serving else None
        if binding is None:
            binding = self.session.io_binding()
            cache.bind(binding, self._pasts, self._presents, lo, hi)
            if serving:
                if len(self._bindings) >= MAX_BINDINGS:
                    self._bindings.clear()
                self._bindings[(lo, hi)] = binding
        return binding

    # -- scoring -------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> np.ndarray:
        n = len(token_ids)
        if n > self.max_context:
            raise UnsupportedError(f"{n} tokens exceed the model's context of {self.max_context}")
        scratch = self._buffers(1, -(-n // BLOCK_SIZE) * BLOCK_SIZE)
        try:
            return self._session_run(scratch, 0, 1, np.asarray([token_ids], np.int64), np.array([n - 1], np.int32),
                                     np.array([n], np.int32), np.arange(n, dtype=np.int64), self._limit(scratch))
        finally:
            scratch.close()

    def memory_bytes(self) -> int:
        # The initializers dominate the session, which holds them as stored. The KV buffers are
        # address space committed only as written: the engine counts the cache at its capacity.
        return self._weights_bytes

    def _close_cache(self) -> None:
        self._bindings.clear()
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def close(self) -> None:
        self._close_cache()
        self.session = None


class OnnxEncoderRunner(Runner):
    """An encoder graph (dynamo export): padded batches in, last hidden states out."""

    task = "embed"

    def __init__(self, session: ort.InferenceSession, artifact: Artifact, device: str):
        self.session = session
        self.device = device
        self.max_context = int(read_meta(artifact)["max_context"])
        self._weights_bytes = weights_bytes(artifact)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        return self.session.run(None, feed)[0].astype(np.float32)

    def memory_bytes(self) -> int:
        return self._weights_bytes

    def close(self) -> None:
        self.session = None
