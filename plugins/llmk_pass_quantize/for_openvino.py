"""quantize on OpenVINO IR: NNCF weight compression."""

from __future__ import annotations

import shutil
from pathlib import Path

from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk_pass_quantize.optimizer import QuantizeOptions


def quantize(artifact: Artifact, out_dir: Path, options: QuantizeOptions) -> None:
    import nncf
    import openvino as ov

    if options.activations:
        raise UnsupportedError("quantize: activations=true is not available on openvino (it needs calibration data)")
    model = ov.Core().read_model(str(artifact.path / "model.xml"))
    if options.bits == 8:
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM,
                                           group_size=options.group_size, ratio=1.0, all_layers=True)
    ov.save_model(compressed, str(out_dir / "model.xml"), compress_to_fp16=False)
    _copy_metadata(artifact.path, out_dir)


def _copy_metadata(src: Path, dst: Path) -> None:
    for file in src.glob("*.json"):
        if not file.name.startswith("llmk-manifest"):
            shutil.copy(file, dst / file.name)
