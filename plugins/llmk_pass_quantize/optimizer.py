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

On llamacpp the pass runs llama.cpp's own quantizer on the GGUF (``for_llamacpp.py``):
``gguf_type`` names one of its types (``GGUF_TYPES``), and ``bits`` alone picks Q8_0
(8) or Q4_K_M (4). Its K-quants work on rows of 256 weights: a model whose rows are
not a multiple of 256 (SmolLM2's are 576 wide) gets llama.cpp's fallback types for
those tensors (Q5_0/Q5_1/Q8_0, see ``for_llamacpp.py``), so Q4_K_M there is mostly
5-bit. Options that mean nothing to llama.cpp (``group_size``, ``activations``,
``int8_compute``) are refused there rather than ignored, and ``gguf_type`` is refused
on every other backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator, model_validator

from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk.optimizer import Optimizer, PassOptions

#: llama.cpp's quantization types (``llama_ftype``, as llama-quantize names them) that need no
#: importance matrix, with the bits per weight of their main tensors (for ``bits``).
GGUF_TYPES: dict[str, tuple[int, int]] = {
    "Q8_0": (7, 8), "Q6_K": (18, 6),
    "Q5_0": (8, 5), "Q5_1": (9, 5), "Q5_K_S": (16, 5), "Q5_K_M": (17, 5),
    "Q4_0": (2, 4), "Q4_1": (3, 4), "Q4_K_S": (14, 4), "Q4_K_M": (15, 4), "IQ4_NL": (25, 4), "IQ4_XS": (30, 4),
    "Q3_K_S": (11, 3), "Q3_K_M": (12, 3), "Q3_K_L": (13, 3), "Q2_K": (10, 2),
}
#: What ``bits`` alone means on llamacpp.
GGUF_TYPE_FOR_BITS = {8: "Q8_0", 4: "Q4_K_M"}


class QuantizeOptions(PassOptions):
    bits: Literal[4, 8] = 8
    #: Weights per scale and minimum for int4. int8 uses groups of 32 on onnxruntime and
    #: openvino (their fast kernels are block-wise) and one scale per row on torch.
    group_size: Literal[16, 32, 64, 128] = 32
    #: Also quantize activations at run time (dynamic int8). Lossy: ~2x perplexity on SmolLM2.
    activations: bool = False
    #: onnxruntime: let MatMulNBits compute in int8, quantizing activations per block of
    #: 32 inside the kernel (accuracy level 4). Measured on SmolLM2 int8: +0.3%
    #: perplexity and 26x the speed of its float path on this CPU. torch and openvino ignore
    #: it; llamacpp refuses false (llama.cpp picks its own activation types).
    int8_compute: bool = True
    #: llamacpp only: one of llama.cpp's types (``GGUF_TYPES``: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0...).
    #: Unset: ``bits`` picks Q8_0 (8) or Q4_K_M (4).
    gguf_type: str | None = None

    @field_validator("gguf_type")
    @classmethod
    def _known_gguf_type(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.upper()
        if name not in GGUF_TYPES:
            raise ValueError(f"unknown gguf_type {value!r}; llama.cpp's types: {', '.join(GGUF_TYPES)}")
        return name

    @model_validator(mode="after")
    def _activations_need_int8(self) -> QuantizeOptions:
        if self.activations and self.bits != 8:
            raise ValueError("activations=true is dynamic int8 quantization; it needs bits=8")
        return self

    @model_validator(mode="after")
    def _bits_agree_with_gguf_type(self) -> QuantizeOptions:
        if self.gguf_type and "bits" in self.model_fields_set and GGUF_TYPES[self.gguf_type][1] != self.bits:
            raise ValueError(f"gguf_type={self.gguf_type} is {GGUF_TYPES[self.gguf_type][1]}-bit, "
                             f"not bits={self.bits}; give one of them")
        return self

    def llamacpp_type(self) -> str:
        """The llama.cpp type to write; refuses the options llama.cpp has no use for."""
        meaningless = [f"{name}={getattr(self, name)}".lower() for name in ("group_size", "activations", "int8_compute")
                       if getattr(self, name) != type(self).model_fields[name].default]
        if meaningless:
            raise UnsupportedError(
                f"quantize on llamacpp: {', '.join(meaningless)} has no meaning for llama.cpp's quantizer "
                f"(its types fix their own block sizes, and it quantizes weights only); "
                f"choose a type with gguf_type ({', '.join(GGUF_TYPES)})")
        return self.gguf_type or GGUF_TYPE_FOR_BITS[self.bits]


class QuantizePass(Optimizer):
    name = "quantize"
    # 3: onnxruntime and openvino write their own graphs: int4 with a float minimum,
    #    the embedding table and output head in 8 bits
    # 4: torch quantizes the tied embedding table (int8) and keeps int4 scales in fp16
    # 5: onnxruntime rewrites llmk's GroupQueryAttention graph (group sums from MatMulNBits itself)
    # 6: llamacpp (llama.cpp's own quantizer, gguf_type)
    version = "6"
    backends: ClassVar[frozenset[str]] = frozenset({"torch", "onnxruntime", "openvino", "llamacpp"})
    Options = QuantizeOptions
    presets: ClassVar[dict[str, dict]] = {
        "int8": {"bits": 8},
        "int4": {"bits": 4, "group_size": 32},
        "int4-g64": {"bits": 4, "group_size": 64},
        "dynamic-int8-lossy": {"bits": 8, "activations": True},
    }

    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: QuantizeOptions) -> None:
        if options.gguf_type is not None and backend != "llamacpp":
            raise UnsupportedError(f"quantize: gguf_type={options.gguf_type} is a llama.cpp type, for backend "
                                   f"llamacpp only; on {backend} choose bits (and group_size)")
        if backend == "llamacpp":
            from llmk_pass_quantize.for_llamacpp import quantize
        elif backend == "openvino":
            from llmk_pass_quantize.for_openvino import quantize
        elif backend == "onnxruntime":
            from llmk_pass_quantize.for_onnxruntime import quantize
        elif backend == "torch":
            from llmk_pass_quantize.for_torch import quantize
        else:  # the kernel checks `backends` first; this guards direct calls
            raise UnsupportedError(f"pass 'quantize' does not support backend {backend!r}")
        quantize(artifact, out_dir, options)

