"""fuse on ONNX: onnxscript's transformer fusions for ONNX Runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

from llmk.artifact import Artifact
from llmk.logs import get_logger
from llmk_pass_fuse.optimizer import FuseOptions

MODEL_FILE = "model.onnx"

log = get_logger("llmk.pass.fuse")


def fuse(artifact: Artifact, out_dir: Path, options: FuseOptions) -> None:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(ir.load(str(artifact.path / MODEL_FILE)))
    log.info("pass.fuse.fusions", **{name: count for name, count in counts.items() if count})
    ir.save(model, str(out_dir / MODEL_FILE), external_data=MODEL_FILE + ".data")
    for file in artifact.path.glob("*.json"):
        if not file.name.startswith("llmk-manifest"):
            shutil.copy(file, out_dir / file.name)
