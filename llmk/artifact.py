"""A model on disk, in one format, at one stage of a pipeline.

A source resolves to an ``hf`` artifact (a Hugging Face directory with
safetensors weights and tokenizer files); a backend may export it to its own
format (``onnx``, ``openvino``); each pass turns an artifact into a new one.
Artifacts are immutable: nothing ever rewrites one that may be serving.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

Task = Literal["generate", "embed"]


@dataclass(frozen=True)
class Artifact:
    """``path`` holds the model in ``format``; ``task`` is what it can serve.

    ``tokenizer_dir`` always points at the Hugging Face files of the original
    source, so every backend tokenizes (and templates chats) identically.
    ``digest`` identifies the content; it keys every cache entry built from this
    artifact. It may be given lazily (a callable) because hashing weights costs
    time that a backend which needs no export never has to spend.
    """

    source: str
    path: Path
    format: str
    task: Task
    tokenizer_dir: Path
    digest_fn: Callable[[], str] = field(repr=False, compare=False)

    @functools.cached_property
    def digest(self) -> str:
        return self.digest_fn()

    def derive(self, path: Path, format: str, digest: str) -> Artifact:
        """A new artifact built from this one (an export or a pass output)."""
        return replace(self, path=path, format=format, digest_fn=lambda: digest)
