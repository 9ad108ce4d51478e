"""The serving figures alone: ``llmk serve`` beside llama.cpp's own server,
``llama-server`` (built by ``make peers``), on the same model — aggregate tokens/s
and TTFT by concurrent streaming clients, how long running streams wait while a
~4,000-token prompt is prefilled, and a repeated ~1,500-token prefix's TTFT
(``llmk.bench.serving``), with the Engine v2 goals. The same as ``llmk bench
--serving-only``; prints the markdown report.

    python bench/serve.py [--backend openvino] [--pass quantize:bits=4] [--clients 1,4,8,16,32]
                          [--part load|interference|prefix ...] [--set prefill_chunk=256 ...]
                          [--runs 3] [--rounds 2] [--tokens 64] [--no-peer] [--json FILE]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from llmk import bench
from llmk.bench import report, serving
from llmk.bench.peers import DEFAULT_PEERS_PYTHON


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--pass", dest="passes", action="append", default=[])
    parser.add_argument("--clients", default="1,4,8,16,32", help="concurrent client counts (default 1,4,8,16,32)")
    parser.add_argument("--part", dest="parts", action="append", choices=serving.PARTS, default=[],
                        help="measure only these figures, repeatable (default: all)")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of llmk serve's model (e.g. prefill_chunk=256), repeatable")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client runs back to back")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-peer", action="store_true", help="llmk serve alone")
    parser.add_argument("--peers-python", default=str(DEFAULT_PEERS_PYTHON))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", help="also write every measurement as JSON to this file")
    args = parser.parse_args()
    data = bench.run(source=args.model, pipelines=[(args.backend, args.passes)],
                     peers=[] if args.no_peer else ["llama.cpp"], peers_python=args.peers_python, runs=args.runs,
                     serve=True, clients=[int(c) for c in args.clients.split(",") if c.strip()],
                     cache_dir=args.cache_dir, command=shlex.join(["python", "bench/serve.py", *sys.argv[1:]]),
                     serve_rounds=args.rounds, tokens=args.tokens, serving_only=True,
                     llmk_options=bench.parse_options(args.options), serve_parts=tuple(args.parts) or None)
    if args.json:
        Path(args.json).write_text(report.to_json(data))
    print(report.markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
