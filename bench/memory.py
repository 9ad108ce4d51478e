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

PROMPT = "The capital of France is"


def measure(backend: str, passes: list[str]) -> dict:
    import llmk
    from llmk.memory import process_rss

    with llmk.Kernel() as kernel:
        kernel.load("warm", "builtin:smollm2", backend=backend, passes=passes)  # imports and caches, not measured
        kernel.unload("warm")
        baseline = process_rss()
        model = kernel.load("m", "builtin:smollm2", backend=backend, passes=passes)
        model.generate(PROMPT, max_tokens=4)
        loaded = process_rss()
        status = model.status()
        kernel.unload("m")
        released = process_rss()
    return {"estimate": status["memory_estimate_bytes"], "reported": status["memory_bytes"],
            "grew": loaded - baseline, "released": (loaded - released) / (loaded - baseline)}


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
