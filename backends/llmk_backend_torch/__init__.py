"""The PyTorch backend (CPU and CUDA), registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_backend_torch.backend import TorchBackend


@hookimpl(trylast=True)
def register_backends(register):
    register.add(TorchBackend)


__all__ = ["TorchBackend"]
