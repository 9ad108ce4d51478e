"""LoRA adapters applied per row, so that requests for different adapters share one forward.

A step lays every sequence's tokens end to end on one token axis; each adapted
linear layer gets a forward hook that adds ``x @ A^T @ B^T * scale`` to the rows
of the sequences using that adapter (as multi-LoRA servers do, without their
custom kernels: one gather, two thin matmuls and one scatter per adapter in the
step). Rows without an adapter are the model alone, bit for bit.

A step whose every row uses the same adapter runs with that adapter merged into
the layers' weights instead: the hooks' many tiny matmuls cost most at batch 1,
where a merged layer costs nothing. One adapter is merged at a time, into
buffers allocated when the first adapter loads (one copy of the adapted layers'
weights) and freed when the last is dropped; the layers' own weights are never
written, so going back to them is a pointer swap.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from llmk.errors import SourceError

_PREFIX = "base_model.model."


@dataclass(eq=False)
class LoraWeights:
    """One adapter on the runner's device: module name -> (A^T [in, r], B^T * scale [r, out])."""

    path: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    #: Whether every adapted layer is a plain float matrix it can be merged into.
    mergeable: bool = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.modules.values() for t in pair)


def load_lora(path: Path, model: Any, device: str, dtype: torch.dtype) -> LoraWeights:
    """Read a peft adapter directory for ``model``; refuse what per-row serving cannot apply."""
    from safetensors.torch import load_file

    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise SourceError(str(path), "not a LoRA adapter directory (no adapter_config.json and "
                                     "adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise SourceError(str(path), f"a {config['peft_type']} adapter; only LoRA is served")
    unsupported = [k for k in ("use_dora", "modules_to_save", "fan_in_fan_out") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise SourceError(str(path), f"adapter options not served per request: {', '.join(unsupported)}")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    tensors = load_file(weights_file)
    named = dict(model.named_modules())
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        module = named.get(name)
        shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if b is None or module is None or shape != (b.shape[0], a.shape[1]):
            raise SourceError(str(path), f"this adapter does not fit the model: no layer {name!r} of shape "
                                         f"{tuple(b.shape[:1]) + tuple(a.shape[1:]) if b is not None else '?'}")
        modules[name] = (a.t().to(device=device, dtype=dtype).contiguous(),
                         (b.t() * scale).to(device=device, dtype=dtype).contiguous())
    if not modules:
        raise SourceError(str(path), "the adapter holds no LoRA weights")
    mergeable = all(isinstance(getattr(named[name], "weight", None), torch.Tensor)
                    and named[name].weight.dtype == dtype for name in modules)
    return LoraWeights(str(path), modules, mergeable)


class RowAdapters:
    """The hooks on a model's adapted layers and, during a forward, which rows use which adapter."""

    def __init__(self, model: Any):
        self._modules = dict(model.named_modules())
        self._hooked: set[str] = set()
        #: (adapter, token rows of the step's axis, or None for all of them), set around a forward.
        self._active: list[tuple[LoraWeights, torch.Tensor | None]] = []
        self._merged: weakref.ref[LoraWeights] | None = None  # the adapter in the layers' weights now
        self._originals: dict[str, torch.Tensor] = {}  # layer -> its own weight, while merged
        self._buffers: dict[str, torch.Tensor] = {}  # layer -> storage for merged weights, reused

    def attach(self, weights: LoraWeights) -> None:
        for name in weights.modules.keys() - self._hooked:
            self._modules[name].register_forward_hook(partial(self._apply, name))
            self._hooked.add(name)
        if weights.mergeable:  # allocated now, so that the model's memory is known at load
            for name in weights.modules.keys() - self._buffers.keys():
                self._buffers[name] = torch.empty_like(self._modules[name].weight.data)

    def nbytes(self) -> int:
        """The merge buffers (the layers' own weights are the model's)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def release(self) -> None:
        """No adapter is served any more: the layers' own weights back, the buffers freed."""
        self._unmerge()
        self._buffers.clear()

    @contextmanager
    def applied(self, active: list[tuple[LoraWeights, torch.Tensor | None]]) -> Iterator[None]:
        """Run the forward inside with each adapter on its rows (``None``: every row)."""
        whole = active[0][0] if len(active) == 1 and active[0][1] is None else None
        if whole is not None and whole.mergeable:
            self._merge(whole)
        else:
            self._unmerge()
            self._active = active
        try:
            yield
        finally:
            self._active = []

    @torch.no_grad()
    def _merge(self, weights: LoraWeights) -> None:
        if self._merged is not None and self._merged() is weights:
            return
        self._unmerge()
        for name, (a, b) in weights.modules.items():
            layer = self._modules[name]
            own, buffer = layer.weight.data, self._buffers[name]
            torch.addmm(own, b.t(), a.t(), out=buffer)  # W + (B * scale) @ A
            self._originals[name] = own
            layer.weight.data = buffer
        self._merged = weakref.ref(weights)

    def _unmerge(self) -> None:
        for name, own in self._originals.items():
            self._modules[name].weight.data = own
        self._originals.clear()
        self._merged = None

    def _apply(self, name: str, module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
        if not self._active:
            return None
        x = inputs[0]  # [1, T, in]
        for weights, rows in self._active:
            pair = weights.modules.get(name)
            if pair is None:
                continue
            a, b = pair
            if rows is None:
                output = output + (x @ a) @ b
            else:
                output = output.index_add(1, rows, (x.index_select(1, rows) @ a) @ b)
        return output
