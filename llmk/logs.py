"""Loggers for library code: structured events with constant names.

The library never configures logging. When the host (or llmk's CLI and daemon)
has configured structlog, events go through that pipeline; otherwise they go to
the standard ``logging`` module under ``llmk.*`` names, which is quiet below
WARNING by default, so an embedding app's stdout is never written to.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog


class _Logger:
    """Chooses the route at each call: the host may configure logging after import."""

    def __init__(self, name: str):
        self._name = name
        self._stdlib = structlog.wrap_logger(
            logging.getLogger(name),
            wrapper_class=structlog.stdlib.BoundLogger,
            processors=[structlog.stdlib.filter_by_level, structlog.processors.KeyValueRenderer(key_order=["event"])],
        )

    def _route(self) -> Any:
        return structlog.get_logger(self._name) if structlog.is_configured() else self._stdlib

    def debug(self, event: str, **kw: Any) -> None:
        self._route().debug(event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._route().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._route().warning(event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._route().error(event, **kw)


def get_logger(name: str) -> _Logger:
    return _Logger(name)
