"""``llmk bench``: measured, repeatable figures for docs/BENCHMARKS.md.

Every figure is the median of several runs, reported with its min and max; each
run loads the model in a fresh ``Kernel`` from a warm cache, so load times are
what a restart costs. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PROMPT = "Once upon a time"
DECODE_TOKENS = 64


@dataclass
class Figure:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def cell(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} ({min(self.values):.{digits}f}–{max(self.values):.{digits}f})"


@dataclass
class Row:
    backend: str
    pipeline: list[str]
    load_seconds: Figure = field(default_factory=Figure)
    first_token_seconds: Figure = field(default_factory=Figure)
    decode_tokens_per_s: Figure = field(default_factory=Figure)
    perplexity: float = 0.0
    artifact_bytes: int = 0

    @property
    def passes(self) -> str:
        return " ".join(self.pipeline) or "none"


def prepare(row: Row, *, source: str, cache_dir: str | None) -> None:
    """Build what the cache lacks (exports, passes) and take the run-independent figures."""
    from llmk.cli import artifact_bytes
    from llmk.kernel import QUALITY_TEXT, Kernel

    with Kernel(cache_dir=cache_dir) as kernel:
        model = kernel.load("bench", source=source, backend=row.backend, passes=row.pipeline)
        row.perplexity = model.perplexity(QUALITY_TEXT.read_text())
        row.artifact_bytes = artifact_bytes(model.version.artifact.path)


def sample(row: Row, *, source: str, cache_dir: str | None) -> None:
    """One run: a fresh kernel loads from the warm cache, answers, then decodes."""
    from llmk.kernel import Kernel

    with Kernel(cache_dir=cache_dir) as kernel:
        started = time.perf_counter()
        model = kernel.load("bench", source=source, backend=row.backend, passes=row.pipeline)
        loaded = time.perf_counter()
        model.generate(PROMPT, max_tokens=1, temperature=0)
        row.load_seconds.values.append(loaded - started)
        row.first_token_seconds.values.append(time.perf_counter() - started)
        result = model.generate(PROMPT, max_tokens=DECODE_TOKENS, temperature=0)
        decode = result.seconds - result.first_token_seconds
        row.decode_tokens_per_s.values.append((result.completion_tokens - 1) / decode)


def machine() -> dict[str, Any]:
    import os

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {p: ver(p) for p in ("llmk", "torch", "transformers", "onnxruntime", "openvino")},
    }


def markdown(rows: list[Row], *, command: str, info: dict[str, Any], runs: int) -> str:
    def ratio(row: Row, base: Row | None) -> str:
        return f"{row.decode_tokens_per_s.median / base.decode_tokens_per_s.median:.2f}" if base else "–"

    plain = {r.backend: r for r in rows if not r.pipeline}
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; {versions}  ",
        f"SmolLM2-135M-Instruct, fp32 activations, batch 1, greedy; median (min–max) of {runs} runs, each in a "
        "fresh Kernel from a warm cache, the rows' runs interleaved.",
        "",
        "| backend | passes | decode tokens/s | × torch | × no passes | load → first token (s) | load (s) "
        "| perplexity | artifact MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r.decode_tokens_per_s.median):
        lines.append(
            f"| {r.backend} | {r.passes} | {r.decode_tokens_per_s.cell()} | {ratio(r, plain.get('torch'))} | "
            f"{ratio(r, plain.get(r.backend)) if r.pipeline else '–'} | {r.first_token_seconds.cell(2)} | "
            f"{r.load_seconds.cell(2)} | {r.perplexity:.3f} | {r.artifact_bytes / 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run(backends: list[str], *, source: str, passes: list[str], runs: int, cache_dir: str | None,
        command: str) -> str:
    """Each backend without passes and, when ``passes`` are given, with them: the
    speed-up of a pipeline is measured against its own baseline in the same run."""
    pipelines = [[], list(passes)] if passes else [[]]
    rows = [Row(backend, pipeline) for backend in backends for pipeline in pipelines]
    for row in rows:
        prepare(row, source=source, cache_dir=cache_dir)
    for _ in range(runs):  # interleaved: a slow minute on the machine hits every row alike
        for row in rows:
            sample(row, source=source, cache_dir=cache_dir)
    return markdown(rows, command=command, info=machine(), runs=runs)
