"""``llmk bench``: llmk and its peers, measured on the same machine in the same run.

For each backend × pass pipeline on the model (SmolLM2 by default), and for each
peer on the same model files (``peers.py``): batch-1 decode tokens/s, time to
first token, cold and warm load → first token, peak memory and perplexity
(``worker.py``, one fresh process per measurement, the targets' runs
interleaved); then the serving figures of ``llmk serve`` beside llama.cpp's own
server, ``llama-server`` (``serving.py``): aggregate tokens/s and TTFT with 1 to
32 concurrent streaming clients, how long running streams stall while a long
prompt is prefilled, and how much a repeated prefix saves. Every figure is the
median of several runs with its min and max; the report names the command, the
machine and every library version, states the goals it was run against, and
can draw a chart (``report.py``).

``quick`` measures the best pipeline of each backend, two runs each, in a few
minutes; the full run is what docs/BENCHMARKS.md records. ``serving_only``
measures the servers alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmk.bench.report import Figure
from llmk.logs import get_logger

if TYPE_CHECKING:
    from llmk.bench.serving import Server

log = get_logger("llmk.bench")

PROMPT = "Once upon a time"
DECODE_TOKENS = 64
WORKER = Path(__file__).with_name("worker.py")

#: The pipelines measured when none are given: every backend in fp32, int8 and int4.
FULL_PIPELINES = [(b, p) for b in ("openvino", "onnxruntime", "torch") for p in ([], ["quantize"],
                                                                                   ["quantize:bits=4"])]
#: The quick mode's: each backend's fastest configuration, and torch as it loads.
QUICK_PIPELINES = [("openvino", ["quantize"]), ("onnxruntime", ["quantize"]), ("torch", [])]


@dataclass
class Target:
    """One engine on one set of model files: a row of the report."""

    engine: str  # "llmk" or a peer's name
    runtime: str  # what computes: openvino, onnxruntime, torch, llama.cpp
    weights: str  # fp32, int8, int4, or the peer's own format
    python: str
    job: dict[str, Any]
    passes: list[str] = field(default_factory=list)
    artifact_bytes: int | None = None
    follows: Target | None = None  # the llmk row whose files this peer reads
    figures: dict[str, Figure] = field(default_factory=dict)
    perplexity: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        if self.engine == "llmk":
            return f"llmk {self.runtime} {' '.join(self.passes) or 'none'}"
        return f"{self.engine} ({self.weights})"

    def median(self, figure: str) -> float | None:
        found = self.figures.get(figure)
        return found.median if found and found.values else None


@dataclass
class Serving:
    """One server's serving figures (``serving.py``), by name: ``tokens_per_s@8``,
    ``ttft_p50_s@8``, ``ttft_p95_s@8`` for 8 clients, ``max_wait_s``, ``prefix_ratio``...;
    ``command`` says how it was started."""

    name: str
    figures: dict[str, Figure] = field(default_factory=dict)
    error: str | None = None
    command: str = ""

    def median(self, figure: str) -> float | None:
        found = self.figures.get(figure)
        return found.median if found and found.values else None

    @property
    def clients(self) -> list[int]:
        """The client counts measured."""
        return sorted(int(k.split("@")[1]) for k in self.figures if k.startswith("tokens_per_s@"))


def weights_of(passes: list[str]) -> str:
    if not passes:
        return "fp32"
    quantize = next((p for p in passes if p.startswith("quantize")), None)
    bits = "int4" if quantize and ("bits=4" in quantize or "int4" in quantize) else "int8" if quantize else "fp32"
    others = [p for p in passes if not p.startswith("quantize")]
    return bits + (f" + {' '.join(others)}" if others else "")


def _work(target: Target, **extra: Any) -> dict[str, Any]:
    """Run one worker process for ``target``; its result or raises with its error output."""
    job = {**target.job, **extra}
    done = subprocess.run([target.python, str(WORKER), json.dumps(job)], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"})
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"{target.label} failed (exit {done.returncode}): {' | '.join(tail)}")


def llmk_targets(source: str, pipelines: list[tuple[str, list[str]]], cache_dir: str | None) -> tuple[
        list[Target], dict[str, Path]]:
    """One target per pipeline, built into the cache now (exports and passes are
    not what a run measures); also returns the source's files, for the peers."""
    from llmk.cli import artifact_bytes
    from llmk.kernel import Kernel
    from llmk.sources import as_hf

    targets, files = [], {}
    with Kernel(cache_dir=cache_dir, autoload=False) as kernel:
        for backend, passes in pipelines:
            model = kernel.load("bench", source=source, backend=backend, passes=passes)
            version = model.version
            files.setdefault("hf", as_hf(version.plan.source, kernel.cache).path)
            files.setdefault("tokenizer", version.plan.source.tokenizer_dir)
            target = Target("llmk", backend, weights_of(passes), sys.executable,
                            {"engine": "llmk", "source": source, "backend": backend, "passes": passes,
                             "cache_dir": cache_dir}, passes=passes,
                            artifact_bytes=artifact_bytes(version.artifact.path))
            target.job["artifact"] = str(version.artifact.path)
            targets.append(target)
            kernel.unload("bench")
    return targets, files


def peer_targets(peers: list[str], env: Any, source: str, ours: list[Target], files: dict[str, Path],
                 cache_dir: str | None) -> tuple[list[Target], list[str]]:
    """The peers' rows on the same files; and a line for each peer left out, saying why."""
    from llmk.bench import peers as p
    from llmk.cache import Cache

    cache = Cache(cache_dir)
    targets, missing = [], []
    for peer in peers:
        python = env.pythons.get(peer)
        if python is None:
            missing.append(f"{peer}: not installed (bash bench/setup_peers.sh)")
            continue
        try:
            if peer == "transformers":
                targets.append(Target(peer, "torch", "fp32", python, {"engine": peer, "path": str(files["hf"])},
                                      follows=next((t for t in ours if t.runtime == "torch" and not t.passes), None)))
            elif peer == "llama.cpp":
                gguf = p.gguf_file(source)
                if gguf is None:
                    missing.append(f"{peer}: {source} has no GGUF file")
                    continue
                targets.append(Target(peer, "llama.cpp", gguf.name.rsplit(".", 2)[-2] + " GGUF", python,
                                      {"engine": peer, "path": str(gguf)}, artifact_bytes=gguf.stat().st_size))
            else:
                for mine in (t for t in ours if t.runtime == p.FOLLOWS[peer]):
                    artifact = Path(mine.job["artifact"])
                    if peer == "onnxruntime-genai":
                        folder = p.onnxruntime_genai_dir(cache, artifact, files["tokenizer"])
                        targets.append(Target(peer, mine.runtime, mine.weights, python,
                                              {"engine": peer, "path": str(folder)}, follows=mine,
                                              artifact_bytes=mine.artifact_bytes))
                        continue
                    folder = p.openvino_genai_dir(cache, artifact, files["tokenizer"], python)
                    # Once with llmk's compile settings (the same computation: the overhead figure),
                    # once with OpenVINO's defaults (bf16 where the CPU has it, u8 KV cache, dynamic
                    # activation quantization: faster, not token-identical to fp32).
                    targets.append(Target(peer, mine.runtime, mine.weights, python,
                                          {"engine": peer, "path": str(folder), "properties": p.openvino_settings()},
                                          follows=mine, artifact_bytes=mine.artifact_bytes))
                    targets.append(Target(peer, mine.runtime, f"{mine.weights}, runtime defaults", python,
                                          {"engine": peer, "path": str(folder)}, artifact_bytes=mine.artifact_bytes))
        except Exception as error:  # one peer that cannot be set up leaves the others
            missing.append(f"{peer}: could not be set up: {error}")
    return targets, missing


def parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict, each value read as YAML (``prefill_chunk=256`` → 256)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    return options


def serving_pipeline(ours: list[Target], pipelines: list[tuple[str, list[str]]]) -> tuple[str, list[str]]:
    """What ``llmk serve`` serves: the fastest llmk row measured, else (serving
    only) the given pipeline with the most passes, the first on ties."""
    measured = [t for t in ours if t.median("decode_tokens_per_s")]
    if measured:
        best = max(measured, key=lambda t: t.median("decode_tokens_per_s"))
        return best.runtime, best.passes
    return max(pipelines, key=lambda p: len(p[1]))


def measure_targets(targets: list[Target], runs: int) -> None:
    """Perplexity once, then ``runs`` runs of every target's figures, interleaved."""
    from llmk.kernel import QUALITY_TEXT

    for target in targets:
        try:
            if target.engine not in ("openvino-genai", "onnxruntime-genai"):  # they expose no logits
                target.perplexity = _work(target, text=QUALITY_TEXT.read_text())["perplexity"]
        except Exception as error:
            target.error = str(error)
    for _ in range(runs):  # interleaved: a slow minute on the machine hits every row alike
        for target in targets:
            if target.error:
                continue
            try:
                for key, value in _work(target).items():
                    target.figures.setdefault(key, Figure()).values.append(value)
            except Exception as error:
                target.error = str(error)
            log.info("bench.measured", target=target.label, error=target.error)


def measure_servers(servers: list[Server], clients: list[int], runs: int, rounds: int, tokens: int,
                    parts: tuple[str, ...]) -> list[Serving]:
    """The serving figures of ``servers``, each started fresh, their runs interleaved."""
    from llmk.bench import serving

    found = serving.measure(servers, clients, runs=runs, rounds=rounds, tokens=tokens, parts=parts)
    return [Serving(server.name, {k: Figure(v) for k, v in result.figures.items()}, result.error, server.command)
            for server, result in zip(servers, found)]


def run(*, source: str, pipelines: list[tuple[str, list[str]]], peers: list[str], peers_python: str | None,
        runs: int, serve: bool, clients: list[int], cache_dir: str | None, command: str,
        serve_rounds: int = 2, tokens: int = DECODE_TOKENS, serving_only: bool = False,
        llmk_options: dict[str, Any] | None = None, serve_parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Measure everything (``serving_only``: the servers alone; ``serve_parts``: some
    of ``serving.PARTS``); returns the report's data (``report.markdown`` renders it).
    ``llmk_options`` extend the config of ``llmk serve``'s model (``serving.llmk_model``):
    engine options such as ``prefill_chunk``."""
    from llmk.bench import serving
    from llmk.bench.peers import PeerEnv, gguf_file
    from llmk.bench.report import machine

    env = PeerEnv.find(peers, peers_python)
    ours: list[Target] = []
    targets: list[Target] = []
    missing: list[str] = []
    if not serving_only:
        ours, files = llmk_targets(source, pipelines, cache_dir)
        theirs, missing = peer_targets(peers, env, source, ours, files, cache_dir)
        targets = ours + theirs
        for target in targets:
            target.job.update(prompt=PROMPT, tokens=tokens, threads=os.cpu_count() or 1)
        measure_targets(targets, runs)

    servers: list[Serving] = []
    if serve and clients:
        backend, passes = serving_pipeline(ours, pipelines)
        model = serving.llmk_model(source, backend, passes, max(clients), **(llmk_options or {}))
        plans = [serving.llmk_plan(sys.executable, model, cache_dir)]
        gguf = gguf_file(source)
        if "llama.cpp" in peers:
            if env.llama_server is None:
                missing.append("llama-server: not built (make peers)")
            elif gguf is None:
                missing.append(f"llama-server: {source} has no GGUF file")
            else:
                plans.append(serving.llama_server_plan(env.llama_server, gguf, os.cpu_count() or 1, max(clients)))
        servers = measure_servers(plans, clients, runs, serve_rounds, tokens, serve_parts or serving.PARTS)

    return {"command": command, "machine": machine(env.versions), "source": source, "runs": runs,
            "tokens": tokens, "prompt": PROMPT, "serve_rounds": serve_rounds, "targets": targets,
            "servers": servers, "missing": missing}
