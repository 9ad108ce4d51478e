"""Where the CPU goes on the Ray path: one client streams ``--answers`` chat answers of 64
tokens from plain ``llmk serve`` and from ``llmk serve --ray`` (one replica, per
``--interval`` of ``ray.stream_interval_ms``), one server at a time. For each: the wall
time, the CPU seconds per second of each process that used any (``/proc/PID/stat``), and
the engine's mean time per output token and TTFT from ``/metrics``.

    python bench/ray_cpu.py [--interval 0 --interval 50] [--answers 6]

Prints a markdown table (one run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

#: Processes shown by name; the rest of Ray's are summed as "other".
SHOWN = {"llmk.cli serve": "server", "LlmkReplica": "replica", "LlmkIngress": "ingress", "ProxyActor": "proxy",
         "ServeController": "controller"}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds of every process so far, by ``SHOWN`` name (else "other")."""
    found: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline", "rb") as cmd:
                fields, command = stat.read().rsplit(")", 1)[1].split(), cmd.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(pid) == os.getpid():
            continue
        name = next((label for key, label in SHOWN.items() if key in command), "other")
        found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, action="append", default=[])
    parser.add_argument("--answers", type=int, default=6)
    args = parser.parse_args()

    import httpx

    from llmk.bench import serving

    intervals = args.interval or [0.0, 50.0]
    model = serving.llmk_model("builtin:smollm2", "onnxruntime", ["quantize:bits=4"], 8)
    plans = [("plain `llmk serve`", None)] + [
        (f"`--ray`, {ms:g} ms", {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "stream_interval_ms": ms})
        for ms in intervals]
    print(f"Command: `python bench/ray_cpu.py {' '.join(f'--interval {ms:g}' for ms in intervals)} "
          f"--answers {args.answers}`\n")
    names = ["server", "replica", "ingress", "proxy", "controller", "other"]
    print("| | wall (s) | " + " | ".join(f"{n} CPU-s/s" for n in names)
          + " | engine time per output token (ms) | engine TTFT (ms) |")
    print("|---" * (4 + len(names)) + "|")
    for label, ray in plans:
        server = serving.llmk_server(sys.executable, model, None, ray) if ray else \
            serving.llmk_server(sys.executable, model, None)
        with server as url:
            def answer() -> None:
                body = {"model": "bench", "messages": [{"role": "user", "content": "Tell me a story"}],
                        "max_tokens": 64, "stream": True, "temperature": 0}
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
                    for _ in response.iter_raw():
                        pass
            answer()  # warm-up
            before, started = cpu_seconds(), time.perf_counter()
            for _ in range(args.answers):
                answer()
            wall, after = time.perf_counter() - started, cpu_seconds()
            metrics = httpx.get(url + "/metrics", timeout=30).text
        use = {n: (after.get(n, 0.0) - before.get(n, 0.0)) / wall for n in names}
        tpot, ttft = (mean(metrics, f"llmk_{m}_seconds") * 1000
                      for m in ("time_per_output_token", "time_to_first_token"))
        print(f"| {label} | {wall:.1f} | " + " | ".join(f"{use[n]:.2f}" for n in names)
              + f" | {tpot:.1f} | {ttft:.1f} |", flush=True)
    return 0


def mean(metrics: str, family: str) -> float:
    """A histogram's mean over every label set (sum over count)."""
    totals = {"_sum": 0.0, "_count": 0.0}
    for line in metrics.splitlines():
        for suffix in totals:
            if line.startswith(family + suffix):
                totals[suffix] += float(line.split()[-1])
    return totals["_sum"] / totals["_count"] if totals["_count"] else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
