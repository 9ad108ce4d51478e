"""The llama.cpp backend (GGUF files as they are, CPU and CUDA), registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_backend_llamacpp.backend import LlamaCppBackend


@hookimpl(trylast=True)
def register_backends(register):
    register.add(LlamaCppBackend)


__all__ = ["LlamaCppBackend"]
