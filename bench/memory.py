"""Memory per backend on SmolLM2: the estimate before a load, what the backend
reports after it, how much the process really grew, and how much of that an
unload gives back. Prints the markdown table of docs/BENCHMARKS.md ("Memory").

    python bench/memory.py [--backend B]... [--pass P]...

Each row runs in its own process, so one backend's allocations cannot hide
another's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

PROMPT = "The capital of France is"


def load_growth(source: str, backend: str, passes: list[str], inspect: Callable[[Any], dict]) -> dict:
    """How much the process grew over a load of ``source``, its warm-up and a 4-token
    request or an embedding (imports and caches warmed by a load before, not measured), what
    ``inspect(model)`` read from the loaded model, and the share of the growth that
    unloading it gave back."""
    import llmk
    from llmk.memory import process_rss

    with llmk.Kernel() as kernel:
        kernel.load("warm", source, backend=backend, passes=passes)
        kernel.unload("warm")
        baseline = process_rss()
        model = kernel.load("m", source, backend=backend, passes=passes)
        if model.version.artifact.task == "embed":
            model.embed([PROMPT])
        else:
            model.generate(PROMPT, max_tokens=4)
        loaded = process_rss()
        found = inspect(model)
        kernel.unload("m")
        released = process_rss()
    return {**found, "grew": loaded - baseline, "released": (loaded - released) / (loaded - baseline)}


def measure(backend: str, passes: list[str]) -> dict:
    def reported(model: Any) -> dict:
        status = model.status()
        return {"estimate": status["memory_estimate_bytes"], "reported": status["memory_bytes"]}

    return load_growth("builtin:smollm2", backend, passes, reported)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", dest="backends", action="append", default=[])
    parser.add_argument("--pass", dest="passes", action="append", default=[])
    parser.add_argument("--row", nargs=2, metavar=("BACKEND", "PASSES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # one measurement, in this process
        backend, passes = args.row
        print(json.dumps(measure(backend, [p for p in passes.split(" ") if p])))
        return 0
    pipelines = [[], args.passes or ["quantize"]]
    print("| backend | passes | estimate MB | reported MB | process grew MB | released after unload |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends or ["torch", "onnxruntime", "openvino"]:
        for pipeline in pipelines:
            done = subprocess.run([sys.executable, __file__, "--row", backend, " ".join(pipeline)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {backend} | {' '.join(pipeline) or 'none'} | {r['estimate'] / 1e6:.0f} | "
                  f"{r['reported'] / 1e6:.0f} | {r['grew'] / 1e6:.0f} | {r['released']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
