"""Pruning on the Hugging Face source, before any export, so every backend gets it.

- ``mlp-channels`` (structured, the default): drops the least important
  intermediate channels of every MLP block (the same number per layer), so the
  model really is smaller and faster; quality is what the quality gate and
  ``llmk eval`` report.
- ``magnitude``: zeroes the smallest weights of every projection matrix. The
  dense formats store zeros like any other number: a sparsity study, not a
  speed-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from llmk.artifact import Artifact
from llmk.optimizer import Optimizer, PassOptions


class PruneOptions(PassOptions):
    method: Literal["mlp-channels", "magnitude"] = "mlp-channels"
    #: Fraction removed: MLP channels per layer, or weights per matrix.
    sparsity: float = Field(0.1, gt=0.0, lt=0.95)


class PrunePass(Optimizer):
    name = "prune"
    version = "2"  # 2: channels scored by calibration activations, not weight norms
    stage = "source"
    backends: ClassVar[frozenset[str]] = frozenset({"torch", "onnxruntime", "openvino"})
    Options = PruneOptions
    presets: ClassVar[dict[str, dict]] = {
        "light": {"method": "mlp-channels", "sparsity": 0.05},
        "mlp-25": {"method": "mlp-channels", "sparsity": 0.25},
        "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    }

    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: PruneOptions) -> None:
        from llmk_pass_prune.for_source import prune

        prune(artifact, out_dir, options)
