"""The ``prune`` pass: magnitude and structured MLP-channel pruning, registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_pass_prune.optimizer import PrunePass


@hookimpl(trylast=True)
def register_passes(register):
    register.add(PrunePass)


__all__ = ["PrunePass"]
