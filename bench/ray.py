"""The cost of the Ray path: ``llmk serve --ray`` (Ray Serve's proxy, the ingress,
one replica; a Ray cluster started on this machine) beside plain ``llmk serve``,
the same model and config, the same streaming clients (``llmk.bench.serving``'s
load figure: aggregate tokens/s and TTFT by concurrent clients). Each server runs
alone (started, measured, stopped: Ray's processes would otherwise take CPU from
the other server), the servers taking turns, ``runs`` times. ``--haproxy`` adds Ray
Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``, an experimental Ray
feature) in place of its Python proxy. ``--interval MS`` (repeatable) runs a Ray server
per ``ray.stream_interval_ms`` (default: the config's default alone). The figures at
more clients are one replica's capacity, what docs/SCALING.md projects from.

    python bench/ray.py [--backend onnxruntime] [--pass quantize:bits=4] [--clients 1,8,16]
                        [--replicas 1] [--runs 3] [--rounds 2] [--tokens 64] [--haproxy]
                        [--interval MS ...] [--json FILE]

Prints a markdown table: medians (min–max) of the runs, and each Ray path's ratio to plain.
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
    parser.add_argument("--clients", default="1,8,16")
    parser.add_argument("--haproxy", action="store_true", help="also Ray Serve with its HAProxy ingress")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--interval", type=float, action="append", default=[],
                        help="ray.stream_interval_ms of a Ray server, repeatable (default: the config's default)")
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
    rays = [{**ray, "stream_interval_ms": ms} for ms in args.interval] or [ray]
    servers = [serving.llmk_plan(sys.executable, model, args.cache_dir)]
    servers += [serving.llmk_plan(sys.executable, model, args.cache_dir, r) for r in rays]
    if args.haproxy:
        servers.append(serving.llmk_plan(sys.executable, model, args.cache_dir, ray,
                                         {"RAY_SERVE_ENABLE_HA_PROXY": "1"}))
    measured = [serving.Measured() for _ in servers]
    for _ in range(args.runs):
        for server, result in zip(servers, measured, strict=True):
            found = serving.measure([server], clients, runs=1, rounds=args.rounds, tokens=args.tokens,
                                    parts=("load",))[0]
            for name, values in found.figures.items():
                result.figures.setdefault(name, []).extend(values)
            result.errors.update(found.errors)
    command = shlex.join(["python", "bench/ray.py", *sys.argv[1:]])
    print(f"Command: `{command}`\n")
    host = machine()
    print(f"Machine: {host.get('cpu')}, {host.get('cores')} cores; {args.runs} runs interleaved\n")
    names = ["llmk serve"] + ([f"--ray, {ms:g} ms" for ms in args.interval] or ["llmk serve --ray"])
    names += ["--ray, HAProxy"] if args.haproxy else []
    print("| clients | figure | " + " | ".join(names) + " | " + " | ".join(f"{n} / plain" for n in names[1:]) + " |")
    print("|---" * (2 + 2 * len(names) - 1) + "|")
    for count in clients:
        for name, label, scale in (("tokens_per_s", "tokens/s", 1.0), ("ttft_p50_s", "TTFT p50 (ms)", 1000.0),
                                   ("ttft_p95_s", "TTFT p95 (ms)", 1000.0)):
            figures = [Figure(m.figures.get(f"{name}@{count}", [])) for m in measured]
            plain = figures[0]
            ratios = [f"{f.median / plain.median:.2f}×" if plain.values and f.values else "–" for f in figures[1:]]
            print(f"| {count} | {label} | " + " | ".join(f.cell(1, scale) for f in figures) + " | "
                  + " | ".join(ratios) + " |")
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
