"""Weight-only quantization: the weights are stored in 8 or 4 bits and
decompressed inside the matrix multiplications; activations stay in floating
point, which is what keeps perplexity close to the original.

The grids are in ``grids.py``: int8 symmetric, int4 with a float minimum (GGUF's
Q8_0 and Q4_1). The embedding table and the output head are always 8-bit and
stored once when tied: in groups of 32 on onnxruntime and openvino, one scale per
row on torch (the layout of its int8 weight-only matmul kernel, which serves the
head: dequantizing a 49152-row head per token would cost 142 ms on this CPU).

Activation quantization (``activations=True``) exists only as an explicitly
named lossy mode: measured on SmolLM2 it roughly doubles perplexity.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import model_validator

from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk.optimizer import Optimizer, PassOptions


class QuantizeOptions(PassOptions):
    bits: Literal[4, 8] = 8
    #: Weights per scale and minimum for int4. int8 uses groups of 32 on onnxruntime and
    #: openvino (their fast kernels are block-wise) and one scale per row on torch.
    group_size: Literal[16, 32, 64, 128] = 32
    #: Also quantize activations at run time (dynamic int8). Lossy: ~2x perplexity on SmolLM2.
    activations: bool = False
    #: onnxruntime: let MatMulNBits compute in int8, quantizing activations per block of
    #: 32 inside the kernel (accuracy level 4). Measured on SmolLM2 int8: +0.3%
    #: perplexity and 26x the speed of its float path on this CPU. Other backends ignore it.
    int8_compute: bool = True

    @model_validator(mode="after")
    def _activations_need_int8(self) -> QuantizeOptions:
        if self.activations and self.bits != 8:
            raise ValueError("activations=true is dynamic int8 quantization; it needs bits=8")
        return self


class QuantizePass(Optimizer):
    name = "quantize"
    # 3: onnxruntime and openvino write their own graphs: int4 with a float minimum,
    #    the embedding table and output head in 8 bits
    # 4: torch quantizes the tied embedding table (int8) and keeps int4 scales in fp16
    # 5: onnxruntime rewrites llmk's GroupQueryAttention graph (group sums from MatMulNBits itself)
    version = "5"
    backends: ClassVar[frozenset[str]] = frozenset({"torch", "onnxruntime", "openvino"})
    Options = QuantizeOptions
    presets: ClassVar[dict[str, dict]] = {
        "int8": {"bits": 8},
        "int4": {"bits": 4, "group_size": 32},
        "int4-g64": {"bits": 4, "group_size": 64},
        "dynamic-int8-lossy": {"bits": 8, "activations": True},
    }

    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: QuantizeOptions) -> None:
        if backend == "openvino":
            from llmk_pass_quantize.for_openvino import quantize
        elif backend == "onnxruntime":
            from llmk_pass_quantize.for_onnxruntime import quantize
        elif backend == "torch":
            from llmk_pass_quantize.for_torch import quantize
        else:  # the kernel checks `backends` first; this guards direct calls
            raise UnsupportedError(f"pass 'quantize' does not support backend {backend!r}")
        quantize(artifact, out_dir, options)

