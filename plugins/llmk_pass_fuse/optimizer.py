"""Fusions that leave the model's output unchanged (greedy output is
token-identical; tested on SmolLM2) and save work per token.

- torch: the Q, K and V projections become one matrix multiplication, and so do
  the MLP's gate and up projections (``llmk_backend_torch.fused``).
- onnxruntime: nothing to do. Its decoder graph is built fused (one Q/K/V and one
  gate/up projection, ``SkipSimplifiedLayerNormalization``, ``GroupQueryAttention``
  with rotary embedding inside), and ONNX Runtime fuses encoder graphs itself when
  it optimizes them, so the kernel skips the pass there.
- openvino: nothing to do. Its CPU plugin fuses RMSNorm, rotary embedding and
  attention (``ScaledDotProductAttention``) whenever it compiles a model, so the
  kernel skips the pass there.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk.optimizer import Optimizer, PassOptions


class FuseOptions(PassOptions):
    #: One projection for Q, K and V (torch; always so on onnxruntime).
    qkv: bool = True
    #: One projection for the MLP's gate and up (torch; always so on onnxruntime).
    gate_up: bool = True


class FusePass(Optimizer):
    name = "fuse"
    backends: ClassVar[frozenset[str]] = frozenset({"torch"})
    native: ClassVar[dict[str, str]] = {
        "onnxruntime": "llmk builds the ONNX decoder graph fused: one Q/K/V and one gate/up projection, "
                       "residual-add + RMSNorm, GroupQueryAttention with rotary embedding",
        "openvino": "OpenVINO fuses RMSNorm, rotary embedding and attention itself when it compiles the model",
    }
    Options = FuseOptions
    presets: ClassVar[dict[str, dict]] = {
        "all": {},
        "attention": {"qkv": True, "gate_up": False},
        "mlp": {"qkv": False, "gate_up": True},
    }

    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: FuseOptions) -> None:
        if backend != "torch":  # the kernel checks `backends` and `native` first; this guards direct calls
            raise UnsupportedError(f"pass 'fuse' does not support backend {backend!r}")
        from llmk_pass_fuse.for_torch import fuse

        fuse(artifact, out_dir, options)
