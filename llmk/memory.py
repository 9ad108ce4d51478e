"""Memory: sizes in configs, the process's resident memory, and the eviction
policy that makes room for a load under the kernel's budget.

The policy is a pure function of what is resident, so it is tested on its own
with made-up models and a fake clock.
"""

from __future__ import annotations

import ctypes
import gc
import re
from dataclasses import dataclass

from llmk.errors import OptionsError

UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
         "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "tb": 1000**4}


def parse_size(value: int | float | str | None, what: str = "memory_budget") -> int | None:
    """``8GiB``, ``512 MB``, ``1.5e9`` or a number of bytes; ``None`` means unlimited."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not match or match[2].lower() not in UNITS:
        raise OptionsError(what, f"{value!r} is not a size (e.g. 8GiB, 512MB, 1000000)")
    return int(float(match[1]) * UNITS[match[2].lower()])


def format_size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def process_rss() -> int:
    """Resident memory of this process, in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that an
    unload shows in the process's resident memory (glibc keeps them otherwise)."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (``malloc_trim``, ~0.1 ms; no collection)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@dataclass(frozen=True)
class Resident:
    """What the policy needs to know about one loaded model version."""

    name: str
    bytes: int
    last_used: float
    pinned: bool = False
    busy: bool = False  # requests running, or not READY (loading, draining): never a victim
    keep_alive_until: float = 0.0  # protected from eviction until then


def choose_victims(needed: int, free: int, residents: list[Resident], now: float) -> list[Resident] | None:
    """The models to evict so that ``needed`` bytes fit, or ``None`` if even
    evicting every candidate would not make room.

    Candidates are idle, unpinned models past their keep-alive; the least
    recently used go first, ties broken by name so the choice is repeatable.
    Nothing is evicted unless the whole set makes room: evicting models and
    then refusing the load anyway would only cost their next reload (thrashing).
    """
    if needed <= free:
        return []
    candidates = sorted(
        (r for r in residents if not r.pinned and not r.busy and r.keep_alive_until <= now),
        key=lambda r: (r.last_used, r.name),
    )
    victims: list[Resident] = []
    for resident in candidates:
        victims.append(resident)
        free += resident.bytes
        if needed <= free:
            return victims
    return None
