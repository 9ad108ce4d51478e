"""quantize on ONNX: MatMulNBits weight-only (or ORT's dynamic quantization, lossy)."""

from __future__ import annotations

import shutil
from pathlib import Path

from llmk.artifact import Artifact
from llmk_pass_quantize.optimizer import QuantizeOptions

MODEL_FILE = "model.onnx"


def quantize(artifact: Artifact, out_dir: Path, options: QuantizeOptions) -> None:
    import onnx
    from llmk_backend_onnxruntime.export import save_onnx
    from llmk_backend_onnxruntime.runner import save_optimized

    # The exported graph feeds weights through Transpose nodes; ONNX Runtime's basic
    # (hardware-independent) optimizations fold them into constant initializers,
    # which is what the weight quantizers look for.
    folded = out_dir / "folded" / MODEL_FILE
    folded.parent.mkdir()
    save_optimized(artifact.path / MODEL_FILE, folded, "basic")
    target = out_dir / MODEL_FILE
    if options.activations:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(folded), str(target), weight_type=QuantType.QInt8, use_external_data_format=True)
    else:
        import logging

        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # It logs every node at INFO; keep the pass's output to what matters.
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

        # int8 is block-wise too: MatMulNBits' 8-bit CPU kernel works on blocks.
        block = options.group_size if options.bits == 4 else 32
        # The embedding table is a fifth of SmolLM2; GatherBlockQuantized stores it in
        # 4 bits (it has no 8-bit form), so only int4 compresses it.
        ops = ("MatMul", "Gather") if options.bits == 4 else ("MatMul",)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(folded)), bits=options.bits, block_size=block,
                                         is_symmetric=False, accuracy_level=4 if options.int8_compute else None,
                                         op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
        quantizer.process()
        save_onnx(quantizer.model.model, target)
    shutil.rmtree(folded.parent)
    for file in artifact.path.glob("*.json"):
        if not file.name.startswith("llmk-manifest"):
            shutil.copy(file, out_dir / file.name)
