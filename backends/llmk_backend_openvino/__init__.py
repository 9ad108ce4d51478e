"""The OpenVINO backend (CPU), registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_backend_openvino.backend import OpenVINOBackend


@hookimpl(trylast=True)
def register_backends(register):
    register.add(OpenVINOBackend)


__all__ = ["OpenVINOBackend"]
