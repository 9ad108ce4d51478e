"""The ``distil`` pass: pruning healed by distillation, registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_pass_distil.optimizer import DistilPass


@hookimpl(trylast=True)
def register_passes(register):
    register.add(DistilPass)


__all__ = ["DistilPass"]
