"""quantize for the llamacpp backend: llama.cpp's own quantizer (``llama_model_quantize``)
on the GGUF, written as ``out_dir / "model.gguf"``.

The input may itself be quantized (``builtin:smollm2`` is Q4_1), so requantizing is
allowed: llama.cpp dequantizes each tensor to f32 and quantizes it again, which adds
the new type's error to the old one; the quality gate measures the result against the
input. llama.cpp chooses each tensor's type from the file type as llama-quantize does
(the mixes of Q4_K_M and friends, norms kept in f32), and falls back to a 32-block type
for a tensor whose rows are not a multiple of 256 (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to
Q8_0): every 576-wide row of SmolLM2. What came out is logged (``pass.llamacpp_types``).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from llmk.artifact import Artifact
from llmk.errors import RuntimeFailure
from llmk.logs import get_logger
from llmk_pass_quantize.optimizer import GGUF_TYPES, QuantizeOptions

log = get_logger("llmk.passes")


def quantize(artifact: Artifact, out_dir: Path, options: QuantizeOptions) -> None:
    import llama_cpp
    from gguf import GGUFReader
    from llmk_backend_llamacpp.backend import MODEL_FILE, gguf_file
    from llmk_backend_llamacpp.runner import init_backend

    gguf_type = options.llamacpp_type()
    source = gguf_file(artifact)
    out_file = out_dir / MODEL_FILE
    init_backend()  # llama.cpp's log to llmk's (errors only), its CPU tables ready
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[gguf_type][0]
    params.nthread = len(os.sched_getaffinity(0))
    params.allow_requantize = True  # the input may be quantized already (SmolLM2's Q4_1)
    started = time.perf_counter()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), params)
    if status != 0 or not out_file.is_file():
        raise RuntimeFailure("llamacpp", f"llama.cpp could not quantize {source.name} to {gguf_type} "
                             f"(llama_model_quantize returned {status}; its error is logged above)")
    types = Counter(tensor.tensor_type.name for tensor in GGUFReader(out_file).tensors)
    log.info("pass.llamacpp_types", source=artifact.source, gguf_type=gguf_type, types=dict(types),
             bytes=out_file.stat().st_size, source_bytes=source.stat().st_size,
             seconds=round(time.perf_counter() - started, 2))
