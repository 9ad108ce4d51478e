"""llmk-example-plugin: the template for third-party llmk plugins.

The ``llmk`` entry point in ``pyproject.toml`` names this module; a ``Kernel``
imports it and registers every ``@llmk.hookimpl`` function found here. Keep this
module cheap to import: heavy frameworks belong inside the functions that use them
(see ``passes.py``).
"""

from __future__ import annotations

from typing import Any

import llmk
from llmk_example_plugin.passes import HalfPass

__version__ = "0.1.0"

#: Every ``model_loaded`` event this plugin has seen, oldest first (read by tests).
EVENTS: list[dict[str, Any]] = []


@llmk.hookimpl
def register_passes(register):
    """Offer the ``half`` pass: ``kernel.load(..., passes=["half"])``."""
    register.add(HalfPass)


@llmk.hookimpl
def model_loaded(name, version, spec, backend, device, seconds):
    """Observer: a model version is loaded and serving. Keep observers quick; one
    that raises is logged (naming this plugin) and does not stop the kernel."""
    EVENTS.append(
        {
            "name": name,
            "version": version,
            "source": spec.source,
            "passes": [str(p) for p in spec.passes],
            "backend": backend,
            "device": device,
            "seconds": seconds,
        }
    )


__all__ = ["EVENTS", "HalfPass", "model_loaded", "register_passes"]
