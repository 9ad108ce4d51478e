"""Fused projections: one matrix multiplication where a block has several on
the same input (Q, K and V in attention; gate and up in a gated MLP).

The format (written by the ``fuse`` pass, read here): ``config.json`` has
``"llmk_fusion": {"qkv": bool, "gate_up": bool}``; the checkpoint holds
``PARENT.qkv_proj.*`` (the rows of q, k and v stacked, in that order) and
``PARENT.gate_up_proj.*`` (gate then up) instead of the separate projections.
Every tensor of a projection is stacked along its first dimension, so quantized
projections (``qweight``, ``scales``, ``zeros``) fuse the same way.

Each output row of a matrix product depends only on its own weight row, so the
fused model computes the same numbers as the original.
"""

from __future__ import annotations

from typing import Any

import torch

CONFIG_KEY = "llmk_fusion"
#: option name -> (fused projection, the projections it replaces, in stacking order)
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "gate_up": ("gate_up_proj", ("gate_proj", "up_proj")),
}


class _PackedCall:
    """Computes a packed projection once for the calls that share its input.

    The model's own code still calls ``q_proj``, ``k_proj`` and ``v_proj`` (or
    ``gate_proj`` and ``up_proj``) in turn on the same tensor; the first call
    computes them all and the others take their slice. Keeping the model's code
    (rather than a copy of it) is what keeps this exact across transformers
    releases. Calls into one model are serialized by the engine, so one pending
    result per block suffices.
    """

    def __init__(self, block: torch.nn.Module, fused_name: str, sizes: list[int]):
        # Looked up per call, not held: loading may replace the projection (quantization does).
        self.block, self.fused_name, self.sizes = block, fused_name, sizes
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._served = 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input:
            projection = getattr(self.block, self.fused_name)
            self._parts, self._input, self._served = projection(x).split(self.sizes, dim=-1), x, 0
        part = self._parts[index]
        self._served += 1
        if self._served == len(self.sizes):  # every slice handed out: drop the references
            self._input, self._parts = None, ()
        return part


class _Slice(torch.nn.Module):
    """Stands in for one of the replaced projections."""

    def __init__(self, packed: _PackedCall, index: int):
        super().__init__()
        self.packed = packed  # a plain object, so the fused weight is registered once
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.part(x, self.index)


def _stacked_linear(linears: list[Any]) -> torch.nn.Module:
    """An uninitialized ``nn.Linear`` (or quantized linear) shaped like ``linears`` stacked by rows."""
    first = linears[0]
    out_features = sum(linear.out_features for linear in linears)
    if isinstance(first, torch.nn.Linear):
        return torch.nn.Linear(first.in_features, out_features, bias=first.bias is not None, dtype=first.weight.dtype)
    from llmk_backend_torch.quantized import QuantizedLinear

    return QuantizedLinear(first.in_features, out_features, first.bits, first.group_size, first.bias is not None,
                           first.compute_dtype)


def fuse_modules(model: torch.nn.Module, spec: dict[str, bool]) -> None:
    """Give every block that has the projections of an enabled group one fused
    projection (empty: the checkpoint's tensors are loaded into it next)."""
    for module in list(model.modules()):
        for option, (fused_name, names) in GROUPS.items():
            if not spec.get(option) or not all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names):
                continue
            linears = [getattr(module, n) for n in names]
            setattr(module, fused_name, _stacked_linear(linears))
            packed = _PackedCall(module, fused_name, [linear.out_features for linear in linears])
            for index, name in enumerate(names):
                setattr(module, name, _Slice(packed, index))
