"""Aggregate throughput of ``llmk serve`` with 1, 4 and 8 concurrent HTTP clients.

    python bench/serve.py [--backend onnxruntime] [--pass quantize] [--rounds 3] [--tokens 64]

Starts a daemon serving SmolLM2 on the chosen backend, then for each client
count runs every client through ``rounds`` greedy completions of ``tokens``
tokens with the ``openai`` client, and reports generated tokens per second over
the wall time (median of 3 repetitions, with min–max) and the ratio to one
client. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["Once upon a time", "The capital of France is", "Write a short poem about the sea.",
           "Explain gravity to a child.", "List three colours:", "My favourite food is",
           "In the year 2050,", "The best way to learn is"]


def start(config: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    process = subprocess.Popen([sys.executable, "-m", "llmk.cli", "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while True:
        line = process.stdout.readline()
        if not line:
            raise SystemExit("llmk serve exited")
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            url = match.group(1)
            break
    while httpx.get(f"{url}/ready").status_code != 200:
        time.sleep(0.5)
    return process, url


def measure(url: str, clients: int, rounds: int, tokens: int) -> float:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def work(index: int) -> int:
        done = 0
        for r in range(rounds):
            prompt = PROMPTS[(index + r) % len(PROMPTS)]
            response = client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0)
            done += response.usage.completion_tokens
        return done

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(work, range(clients)))
    return total / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--pass", dest="passes", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    passes = ", ".join(args.passes)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "llmk.yaml"
        config.write_text(f"server: {{port: 0}}\nmodels:\n  bench: {{source: builtin:smollm2, backend: {args.backend}, "
                          f"passes: [{passes}], max_batch_size: 8}}\n")
        process, url = start(config)
        try:
            measure(url, 1, 1, 8)  # warm up
            rows = {}
            for clients in (1, 4, 8):
                rows[clients] = [measure(url, clients, args.rounds, args.tokens) for _ in range(args.repeat)]
        finally:
            process.terminate()
            process.wait(60)
    single = statistics.median(rows[1])
    print(f"Command: `python bench/serve.py --backend {args.backend}"
          + "".join(f" --pass {p}" for p in args.passes) + f" --rounds {args.rounds} --tokens {args.tokens}`\n")
    print("| clients | aggregate tokens/s | × one client |")
    print("|---|---|---|")
    for clients, values in rows.items():
        median = statistics.median(values)
        print(f"| {clients} | {median:.1f} ({min(values):.1f}–{max(values):.1f}) | {median / single:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
