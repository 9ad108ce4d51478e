"""Aggregate throughput of ``llmk serve`` alone with 1, 4 and 8 concurrent HTTP
clients, on one backend (the issue-6 target: 8 clients ≥ 3× one client).

    python bench/serve.py [--backend onnxruntime] [--pass quantize] [--rounds 2] [--tokens 64] [--repeat 3]

The same measurement as ``llmk bench``'s serving table (``llmk.bench.serving``),
without the peers; prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys

from llmk.bench import serving
from llmk.bench.report import Figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--pass", dest="passes", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with serving.llmk_server(sys.executable, args.model, args.backend, args.passes, None) as url:
        figures = serving.measure(url, [1, 4, 8], runs=args.repeat, rounds=args.rounds, tokens=args.tokens)
    single = Figure(figures[1]).median
    print(f"Command: `python bench/serve.py --backend {args.backend}"
          + "".join(f" --pass {p}" for p in args.passes) + f" --rounds {args.rounds} --tokens {args.tokens}`\n")
    print("| clients | aggregate tokens/s | × one client |")
    print("|---|---|---|")
    for clients, values in figures.items():
        figure = Figure(values)
        print(f"| {clients} | {figure.cell()} | {figure.median / single:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
