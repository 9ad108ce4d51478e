"""llmk: a plugin-based LLM kernel.

``import llmk`` is cheap and has no side effects: the public names below are
imported on first use, and no plugin is discovered until a ``Kernel`` is made.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmk.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

_LAZY = {
    "Kernel": "llmk.kernel",
    "ModelHandle": "llmk.handle",
    "Backend": "llmk.backend",
    "BackendOptions": "llmk.backend",
    "Runner": "llmk.backend",
    "KVLayout": "llmk.backend",
    "SequenceStep": "llmk.backend",
    "Optimizer": "llmk.optimizer",
    "PassOptions": "llmk.optimizer",
    "Artifact": "llmk.artifact",
    "ModelSpec": "llmk.spec",
    "PassSpec": "llmk.spec",
    "GenerationResult": "llmk.generation",
    "StreamChunk": "llmk.sequence",
    "SamplingParams": "llmk.sampling",
    "TokenMask": "llmk.sampling",
    "LlmkError": "llmk.errors",
    "PluginError": "llmk.errors",
    "UnknownNameError": "llmk.errors",
    "DuplicateNameError": "llmk.errors",
    "BackendUnavailableError": "llmk.errors",
    "SourceError": "llmk.errors",
    "OptionsError": "llmk.errors",
    "UnsupportedError": "llmk.errors",
    "ModelNotFoundError": "llmk.errors",
    "ModelLoadError": "llmk.errors",
    "QualityGateError": "llmk.errors",
    "ModelNotReadyError": "llmk.errors",
    "HealthCheckError": "llmk.errors",
    "MemoryBudgetError": "llmk.errors",
    "AlertRule": "llmk.monitor",
    "State": "llmk.lifecycle",
}

__all__ = ["hookimpl", "hookspec", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from llmk.artifact import Artifact
    from llmk.backend import Backend, BackendOptions, KVLayout, Runner, SequenceStep
    from llmk.errors import (
        BackendUnavailableError,
        DuplicateNameError,
        HealthCheckError,
        LlmkError,
        MemoryBudgetError,
        ModelLoadError,
        ModelNotFoundError,
        ModelNotReadyError,
        OptionsError,
        PluginError,
        QualityGateError,
        SourceError,
        UnknownNameError,
        UnsupportedError,
    )
    from llmk.generation import GenerationResult
    from llmk.handle import ModelHandle
    from llmk.kernel import Kernel
    from llmk.lifecycle import State
    from llmk.monitor import AlertRule
    from llmk.optimizer import Optimizer, PassOptions
    from llmk.sampling import SamplingParams, TokenMask
    from llmk.sequence import StreamChunk
    from llmk.spec import ModelSpec, PassSpec
