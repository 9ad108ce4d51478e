"""The cost of the Ray path: ``llmk serve --ray`` (Ray Serve's proxy, the ingress,
one replica; a Ray cluster started on this machine) beside plain ``llmk serve``,
the same model and config, the same streaming clients (``llmk.bench.serving``'s
load figure: aggregate tokens/s and TTFT by concurrent clients), the two servers'
runs interleaved. Also the per-replica figures a capacity projection needs
(docs/SCALING.md).

    python bench/ray.py [--backend onnxruntime] [--pass quantize:bits=4] [--clients 1,8]
                        [--replicas 1] [--runs 3] [--rounds 2] [--tokens 64] [--json FILE]

Prints a markdown table: medians (min–max) of the runs, and Ray's ratio to plain.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from llmk.bench import serving
from llmk.bench.report import Figure, machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--pass", dest="passes", action="append", default=None)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", help="also write every measurement as JSON to this file")
    args = parser.parse_args()
    passes = ["quantize:bits=4"] if args.passes is None else args.passes
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    model = serving.llmk_model(args.model, args.backend, passes, max(clients))
    ray = {"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": 0}}
    servers = [serving.llmk_plan(sys.executable, model, args.cache_dir),
               serving.llmk_plan(sys.executable, model, args.cache_dir, ray)]
    measured = serving.measure(servers, clients, runs=args.runs, rounds=args.rounds, tokens=args.tokens,
                               parts=("load",))
    command = shlex.join(["python", "bench/ray.py", *sys.argv[1:]])
    print(f"Command: `{command}`\n")
    host = machine()
    print(f"Machine: {host.get('cpu')}, {host.get('cores')} cores; {args.runs} runs interleaved\n")
    print("| clients | figure | llmk serve | llmk serve --ray | ray / plain |")
    print("|---|---|---|---|---|")
    for count in clients:
        for name, label, scale in (("tokens_per_s", "tokens/s", 1.0), ("ttft_p50_s", "TTFT p50 (ms)", 1000.0),
                                   ("ttft_p95_s", "TTFT p95 (ms)", 1000.0)):
            plain, over = (Figure(m.figures.get(f"{name}@{count}", [])) for m in measured)
            ratio = f"{over.median / plain.median:.2f}×" if plain.values and over.values else "–"
            print(f"| {count} | {label} | {plain.cell(1, scale)} | {over.cell(1, scale)} | {ratio} |")
    for server, result in zip(servers, measured, strict=True):
        if result.error:
            print(f"\n{server.name} failed: {result.error}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "machine": host, "servers": [
            {"name": s.name, "command": s.command, "figures": m.figures, "errors": m.errors}
            for s, m in zip(servers, measured, strict=True)]}, indent=1))
    return 0 if not any(m.error for m in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
