"""Fusions that leave the model's output unchanged (greedy output is
token-identical; tested on SmolLM2) and save work per token.

- torch: the Q, K and V projections become one matrix multiplication, and so do
  the MLP's gate and up projections (``llmk_backend_torch.fused``).
- onnxruntime: onnxscript's transformer fusions for ONNX Runtime (RMSNorm and
  residual-add + RMSNorm, rotary embedding, attention into ``MultiHeadAttention``),
  which ONNX Runtime's own graph optimizer does not find in a dynamo export.
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
    #: torch: one projection for Q, K and V.
    qkv: bool = True
    #: torch: one projection for the MLP's gate and up.
    gate_up: bool = True


class FusePass(Optimizer):
    name = "fuse"
    backends: ClassVar[frozenset[str]] = frozenset({"torch", "onnxruntime"})
    native: ClassVar[dict[str, str]] = {
        "openvino": "OpenVINO fuses RMSNorm, rotary embedding and attention itself when it compiles the model",
    }
    Options = FuseOptions
    presets: ClassVar[dict[str, dict]] = {
        "all": {},
        "attention": {"qkv": True, "gate_up": False},
        "mlp": {"qkv": False, "gate_up": True},
    }

    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: FuseOptions) -> None:
        if backend == "torch":
            from llmk_pass_fuse.for_torch import fuse
        elif backend == "onnxruntime":
            from llmk_pass_fuse.for_onnxruntime import fuse
        else:  # the kernel checks `backends` first; this guards direct calls
            raise UnsupportedError(f"pass 'fuse' does not support backend {backend!r}")
        fuse(artifact, out_dir, options)
