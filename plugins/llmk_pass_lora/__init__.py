"""The ``lora`` pass: a LoRA adapter merged into the model, registered through the ``llmk`` entry point."""

from llmk import hookimpl
from llmk_pass_lora.optimizer import LoraPass


@hookimpl(trylast=True)
def register_passes(register):
    register.add(LoraPass)


__all__ = ["LoraPass"]
