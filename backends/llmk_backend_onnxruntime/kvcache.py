"""The KV buffers of the decoder graph: per layer a key and a value buffer
``[slots, kv_heads, capacity, head_dim]``, bound (a range of slots at a time)
both as the graph's pasts and as its presents, so that ``GroupQueryAttention``
appends into them in place and nothing is ever copied between steps.

``HostBuffers`` keep them in an anonymous memory map on the host: pages are
committed only when written, and given back with ``madvise``. ``DeviceBuffers``
keep them in ``OrtValue``s on the session's device (CUDA).
"""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from llmk_backend_onnxruntime.builder import ONNX_DTYPES as ELEMENT_TYPES

ITEM_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Shape:
    """One buffer's geometry; every layer's key and value buffer has it."""

    slots: int
    kv_heads: int
    capacity: int
    head_dim: int
    dtype: str

    @property
    def item(self) -> int:
        return ITEM_SIZES[self.dtype]

    @property
    def slot_bytes(self) -> int:
        return self.kv_heads * self.capacity * self.head_dim * self.item

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    def rows(self, count: int) -> list[int]:
        return [count, self.kv_heads, self.capacity, self.head_dim]


@dataclass(frozen=True)
class Run:
    """``count`` consecutive blocks of a slot copied to consecutive blocks of a slot."""

    src_slot: int
    src_block: int  # index within the slot
    dst_slot: int
    dst_block: int
    count: int


def runs(pairs: list[tuple[int, int]], blocks_per_slot: int) -> list[Run]:
    """The copies ``pairs`` asks for, merged into runs within slots that never overlap
    (a device copy of overlapping ranges is undefined)."""
    merged: list[Run] = []
    for src, dst in sorted(pairs):
        if src == dst:
            continue
        (s_slot, s_block), (d_slot, d_block) = divmod(src, blocks_per_slot), divmod(dst, blocks_per_slot)
        last = merged[-1] if merged else None
        if (last is not None and (last.src_slot, last.dst_slot) == (s_slot, d_slot)
                and (s_block, d_block) == (last.src_block + last.count, last.dst_block + last.count)
                and (s_slot != d_slot or abs(d_block - s_block) > last.count)):
            merged[-1] = Run(s_slot, last.src_block, d_slot, last.dst_block, last.count + 1)
        else:
            merged.append(Run(s_slot, s_block, d_slot, d_block, 1))
    return merged


def spans(blocks: list[int], blocks_per_slot: int) -> list[tuple[int, int, int]]:
    """``(slot, first block in the slot, count)`` runs of consecutive blocks."""
    merged: list[list[int]] = []
    for block in sorted(set(blocks)):
        slot, index = divmod(block, blocks_per_slot)
        if merged and merged[-1][0] == slot and merged[-1][1] + merged[-1][2] == index:
            merged[-1][2] += 1
        else:
            merged.append([slot, index, 1])
    return [(slot, index, n) for slot, index, n in merged]


class Buffers(ABC):
    """``2 * layers`` buffers of one ``Shape``, in the graph's past order."""

    def __init__(self, shape: Shape, count: int):
        self.shape, self.count = shape, count

    @property
    def nbytes(self) -> int:
        return self.count * self.shape.nbytes

    @abstractmethod
    def pointer(self, index: int) -> int:
        """Address of buffer ``index`` (slot 0)."""

    @property
    @abstractmethod
    def device(self) -> tuple[str, int]:
        """(device type, id) as IO binding names them."""

    def bind(self, binding: ort.IOBinding, pasts: list[str], presents: list[str], lo: int, hi: int) -> None:
        """Bind slots ``lo..hi-1`` as both the pasts and the presents: a view, since a
        slot's rows are contiguous in every buffer."""
        kind, index = self.device
        element, rows = ELEMENT_TYPES[self.shape.dtype], self.shape.rows(hi - lo)
        offset = lo * self.shape.slot_bytes
        for i, (past, present) in enumerate(zip(pasts, presents)):
            address = self.pointer(i) + offset
            binding.bind_input(past, kind, index, element, rows, address)
            binding.bind_output(present, kind, index, element, rows, address)

    @abstractmethod
    def copy_blocks(self, pairs: list[tuple[int, int]], blocks_per_slot: int, block_size: int) -> None:
        """Copy block ``src`` into block ``dst`` in every buffer, for each pair."""

    def release_blocks(self, blocks: list[int], blocks_per_slot: int, block_size: int) -> None:
        """Give the memory of ``blocks`` back, where the buffers can."""

    def close(self) -> None:
        """Free the buffers."""


class HostBuffers(Buffers):
    """One anonymous memory map holding every buffer: zero pages until written."""

    def __init__(self, shape: Shape, count: int):
        super().__init__(shape, count)
        self._map = mmap.mmap(-1, max(self.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}[shape.dtype]
        flat = np.frombuffer(self._map, dtype=dtype, count=self.nbytes // shape.item)
        self.arrays = list(flat.reshape(count, *shape.rows(shape.slots)))
        self._base = flat.ctypes.data

    @property
    def device(self) -> tuple[str, int]:
        return "cpu", 0

    def pointer(self, index: int) -> int:
        return self._base + index * self.shape.nbytes

    def copy_blocks(self, pairs: list[tuple[int, int]], blocks_per_slot: int, block_size: int) -> None:
        for run in runs(pairs, blocks_per_slot):
            src, dst, length = run.src_block * block_size, run.dst_block * block_size, run.count * block_size
            for array in self.arrays:
                array[run.dst_slot, :, dst:dst + length] = array[run.src_slot, :, src:src + length]

    def release_blocks(self, blocks: list[int], blocks_per_slot: int, block_size: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        head_bytes = self.shape.capacity * self.shape.head_dim * self.shape.item
        position_bytes = self.shape.head_dim * self.shape.item
        for slot, index, n in spans(blocks, blocks_per_slot):
            first = index * block_size
            positions = min(n * block_size, self.shape.capacity - first)
            for buffer in range(self.count):
                for head in range(self.shape.kv_heads):
                    start = (buffer * self.shape.nbytes + slot * self.shape.slot_bytes + head * head_bytes
                             + first * position_bytes)
                    end = start + positions * position_bytes
                    start = -(-start // page) * page  # whole pages inside the range only
                    if end - start >= page:
                        self._map.madvise(mmap.MADV_DONTNEED, start, (end - start) // page * page)

    def close(self) -> None:
        self.arrays = []
        try:
            self._map.close()
        except BufferError:  # a view of it is still alive: the memory goes with the last one
            pass


class DeviceBuffers(Buffers):
    """One ``OrtValue`` per buffer on ``device`` (``cuda:N``; ``cpu`` works too and
    is how this path is tested without a GPU). Blocks are copied on the device by a
    small graph of ``Identity`` nodes bound to the source and target ranges."""

    def __init__(self, shape: Shape, count: int, device: str):
        super().__init__(shape, count)
        kind, _, index = device.partition(":")
        self._device = (kind, int(index or 0))
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape.rows(shape.slots), ELEMENT_TYPES[shape.dtype],
                                                                 *self._device) for _ in range(count)]
        self._copier: ort.InferenceSession | None = None

    @property
    def device(self) -> tuple[str, int]:
        return self._device

    def pointer(self, index: int) -> int:
        return self.values[index].data_ptr()

    def _copy_session(self) -> ort.InferenceSession:
        """``y{j} = Identity(x{j})`` for the ``kv_heads`` runs of every buffer."""
        if self._copier is None:
            from onnx import helper

            element = ELEMENT_TYPES[self.shape.dtype]
            width = self.count * self.shape.kv_heads
            graph = helper.make_graph(
                [helper.make_node("Identity", [f"x{j}"], [f"y{j}"]) for j in range(width)], "llmk-kv-copy",
                [helper.make_tensor_value_info(f"x{j}", element, ["n"]) for j in range(width)],
                [helper.make_tensor_value_info(f"y{j}", element, ["n"]) for j in range(width)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 3
            kind, index = self._device
            providers: list[Any] = ([("CUDAExecutionProvider", {"device_id": index})] if kind == "cuda"
                                    else ["CPUExecutionProvider"])
            self._copier = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        return self._copier

    def copy_blocks(self, pairs: list[tuple[int, int]], blocks_per_slot: int, block_size: int) -> None:
        session, (kind, index) = self._copy_session(), self._device
        element, item = ELEMENT_TYPES[self.shape.dtype], self.shape.item
        head_bytes = self.shape.capacity * self.shape.head_dim * item
        block_bytes = block_size * self.shape.head_dim * item
        for run in runs(pairs, blocks_per_slot):
            length = run.count * block_size * self.shape.head_dim
            binding = session.io_binding()
            j = 0
            for buffer in range(self.count):
                for head in range(self.shape.kv_heads):
                    base = self.pointer(buffer) + head * head_bytes
                    source = base + run.src_slot * self.shape.slot_bytes + run.src_block * block_bytes
                    target = base + run.dst_slot * self.shape.slot_bytes + run.dst_block * block_bytes
                    binding.bind_input(f"x{j}", kind, index, element, [length], source)
                    binding.bind_output(f"y{j}", kind, index, element, [length], target)
                    j += 1
            session.run_with_iobinding(binding)

    def close(self) -> None:
        self.values = []
        self._copier = None
