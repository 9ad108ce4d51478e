"""The quantization grids, in NumPy, for every backend's writer.

Both work row by row on a ``[rows, cols]`` matrix in groups of ``group``
consecutive columns (a matrix product's reduction axis):

- ``symmetric_int8``: ``w = q * scale``, ``q`` in [-127, 127] — GGUF's Q8_0 grid
  when ``group`` is 32.
- ``asymmetric_uint4``: ``w = q * scale + minimum``, ``q`` in [0, 15], with a
  *float* minimum — GGUF's Q4_1 grid when ``group`` is 32. An integer zero point
  (``(q - z) * scale``) cannot land on that grid: on SmolLM2, whose weights are
  dequantized Q4_1, it costs about +16% perplexity where this is lossless.
"""

from __future__ import annotations

import numpy as np


def _groups(weight: np.ndarray, group: int) -> np.ndarray:
    rows, cols = weight.shape
    if cols % group:
        raise ValueError(f"{cols} columns do not split into groups of {group}")
    return weight.astype(np.float32).reshape(rows, cols // group, group)


def symmetric_int8(weight: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """``(q [rows, cols] int8, scales [rows, cols/group] float32)``."""
    grouped = _groups(weight, group)
    scales = np.abs(grouped).max(axis=-1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(grouped / scales[..., None]), -127, 127).astype(np.int8)
    return q.reshape(weight.shape), scales.astype(np.float32)


def asymmetric_uint4(weight: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q [rows, cols] uint8 in 0..15, scales, minimums [rows, cols/group] float32)``."""
    grouped = _groups(weight, group)
    low, high = grouped.min(axis=-1), grouped.max(axis=-1)
    scales = (high - low) / 15.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint((grouped - low[..., None]) / scales[..., None]), 0, 15).astype(np.uint8)
    return q.reshape(weight.shape), scales.astype(np.float32), low.astype(np.float32)


def pack_uint4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte along the last axis, the first in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
