"""The ONNX Runtime backend (CPU, and CUDA with onnxruntime-gpu), registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_backend_onnxruntime.backend import OnnxRuntimeBackend


@hookimpl(trylast=True)
def register_backends(register):
    register.add(OnnxRuntimeBackend)


__all__ = ["OnnxRuntimeBackend"]
