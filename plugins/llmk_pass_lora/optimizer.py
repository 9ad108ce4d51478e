"""Merge a LoRA adapter (``llmk tune``'s, or any peft adapter directory) into the
Hugging Face source, before any export, so that every backend serves the adapted
model at the base model's speed. This is how a model spec's ``adapters`` become
variants (``chat:NAME``) on every backend."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from llmk.artifact import Artifact
from llmk.optimizer import Optimizer, PassOptions


class LoraOptions(PassOptions):
    #: A peft adapter directory (``adapter_config.json`` and its weights). It is
    #: identified by its path: ``llmk tune``'s adapters live in content-addressed
    #: directories, so a path never holds two different adapters.
    adapter: str = Field(min_length=1)


class LoraPass(Optimizer):
    name = "lora"
    version = "1"
    stage = "source"
    backends: ClassVar[frozenset[str]] = frozenset({"torch", "onnxruntime", "openvino"})
    requires = ("peft",)
    install = "pip install 'llmk[tune]'"
    Options = LoraOptions

    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: LoraOptions) -> None:
        from llmk_pass_lora.for_source import merge

        merge(artifact, Path(options.adapter).expanduser(), out_dir)
