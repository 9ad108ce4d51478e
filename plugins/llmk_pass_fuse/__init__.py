"""The ``fuse`` pass: exact graph and module fusions, registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_pass_fuse.optimizer import FusePass


@hookimpl(trylast=True)
def register_passes(register):
    register.add(FusePass)


__all__ = ["FusePass"]
