"""A progress bar for long one-time steps (conversions, exports) whose inner
loop llmk does not own: it names the current stage and keeps the elapsed time
ticking. Shown on a terminal's stderr only."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def stages(what: str, names: list[str]) -> Iterator[Callable[[str], None]]:
    """``with stages("export", ["load", "trace", "save"]) as stage: stage("load") ...``"""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(names), desc=what, file=sys.stderr, disable=None, leave=True,
               bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")
    done = threading.Event()

    def tick() -> None:
        while not done.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    started = False

    def stage(name: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_postfix_str(name)

    try:
        yield stage
        bar.update(bar.total - bar.n)
    finally:
        done.set()
        ticker.join()
        bar.close()
