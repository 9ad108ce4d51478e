"""The ``quantize`` pass: weight-only int8/int4 on every backend, registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_pass_quantize.optimizer import QuantizePass


@hookimpl(trylast=True)
def register_passes(register):
    register.add(QuantizePass)


__all__ = ["QuantizePass"]
