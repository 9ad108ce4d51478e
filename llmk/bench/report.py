"""The benchmark report: markdown tables with ratios, the goals, JSON, a chart."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: The goals the suite reports against (issue 7).
DECODE_GOAL = 1.0  # best llmk configuration × the fastest peer, batch-1 decode
SERVE_GOAL = 1.0  # llmk serve × the best peer server, most clients
OVERHEAD_GOAL = 0.05  # llmk's slowdown against the raw runtime on the same files
FIRST_TOKEN_GOAL = 1.0  # seconds from the start of a cached load to the first token


@dataclass
class Figure:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def cell(self, digits: int = 1, scale: float = 1.0) -> str:
        if not self.values:
            return "–"
        m, lo, hi = self.median * scale, min(self.values) * scale, max(self.values) * scale
        return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def machine(extra_versions: dict[str, str] | None = None) -> dict[str, Any]:
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
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        memory = "?"
    versions = {p: ver(p) for p in ("llmk", "torch", "transformers", "onnxruntime", "openvino")}
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory, "python": platform.python_version(),
            "versions": {**versions, **(extra_versions or {})}}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal: what was compared, the figure, the target, met or not."""
    targets = [t for t in data["targets"] if t.median("decode_tokens_per_s")]
    ours = [t for t in targets if t.engine == "llmk"]
    theirs = [t for t in targets if t.engine != "llmk"]
    found: list[dict[str, Any]] = []
    if ours and theirs:
        best = max(ours, key=lambda t: t.median("decode_tokens_per_s"))
        rival = max(theirs, key=lambda t: t.median("decode_tokens_per_s"))
        value = best.median("decode_tokens_per_s") / rival.median("decode_tokens_per_s")
        found.append({"goal": "batch-1 decode: best llmk ≥ 1.0× the fastest peer",
                      "compared": f"{best.label} vs {rival.label}", "value": f"{value:.2f}×",
                      "met": value >= DECODE_GOAL})
    servers = [s for s in data["servers"] if s.figures]
    llmk_server = next((s for s in servers if s.name.startswith("llmk")), None)
    peer_servers = [s for s in servers if not s.name.startswith("llmk")]
    if llmk_server and peer_servers:
        most = max(llmk_server.figures)
        rival = max(peer_servers, key=lambda s: s.figures[most].median if most in s.figures else 0)
        if most in rival.figures:
            value = llmk_server.figures[most].median / rival.figures[most].median
            found.append({"goal": f"{most}-client aggregate: llmk serve ≥ 1.0× the best peer server",
                          "compared": f"{llmk_server.name} vs {rival.name}", "value": f"{value:.2f}×",
                          "met": value >= SERVE_GOAL})
    for peer in theirs:
        mine = peer.follows
        if mine is None or not mine.median("decode_tokens_per_s"):
            continue
        overhead = 1 - mine.median("decode_tokens_per_s") / peer.median("decode_tokens_per_s")
        found.append({"goal": "llmk's overhead over the runtime it wraps ≤ 5% (decode, same files)",
                      "compared": f"{mine.label} vs {peer.label}", "value": f"{overhead:+.1%}",
                      "met": overhead <= OVERHEAD_GOAL})
    for mine in ours:
        warm = mine.median("warm_first_token_seconds")
        if warm is not None:
            found.append({"goal": "a cached model's first token ≤ 1 s after its load starts",
                          "compared": f"{mine.label} (warm process; cold: {mine.median('first_token_seconds'):.2f} s)",
                          "value": f"{warm:.2f} s", "met": warm <= FIRST_TOKEN_GOAL})
    return found


def markdown(data: dict[str, Any]) -> str:
    info = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        f"Command: `{data['command']}`  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, Python {info['python']}; {versions}  ",
        f"Model: `{data['source']}`; prompt {data['prompt']!r}, {data['tokens']} tokens, greedy, batch 1, "
        f"{info['cores']} threads; median (min–max) of {data['runs']} runs, each in a fresh process, the rows' "
        "runs interleaved.",
        "",
        "| engine | runtime | weights | decode tokens/s | × transformers | TTFT (ms) | cold load → first token (s) "
        "| warm load → first token (s) | peak RSS (MB) | perplexity | model MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    targets = data["targets"]
    baseline = next((t.median("decode_tokens_per_s") for t in targets if t.engine == "transformers"), None)
    ranked = sorted(targets, key=lambda t: -(t.median("decode_tokens_per_s") or 0))
    for t in ranked:
        if t.error and not t.figures:
            continue
        f = t.figures
        engine = f"**llmk** ({' '.join(t.passes) or 'no passes'})" if t.engine == "llmk" else t.engine
        lines.append(
            f"| {engine} | {t.runtime} | {t.weights} | {f.get('decode_tokens_per_s', Figure()).cell()} | "
            f"{_ratio(t.median('decode_tokens_per_s'), baseline)} | {f.get('ttft_seconds', Figure()).cell(0, 1000)} | "
            f"{f.get('first_token_seconds', Figure()).cell(2)} | "
            f"{f.get('warm_first_token_seconds', Figure()).cell(2)} | "
            f"{f.get('peak_rss_bytes', Figure()).cell(0, 1e-6)} | "
            f"{'–' if t.perplexity is None else f'{t.perplexity:.3f}'} | "
            f"{'–' if t.artifact_bytes is None else f'{t.artifact_bytes / 1e6:.0f}'} |")
    failed = [t for t in targets if t.error]
    servers = data["servers"]
    if servers:
        counts = sorted({n for s in servers for n in s.figures})
        lines += ["", f"Concurrent clients (the `openai` client, each running {data['serve_rounds']} completions of "
                      f"{data['tokens']} tokens back to back): aggregate generated tokens/s, median (min–max) of "
                      f"{data['runs']} runs.", "",
                  "| server | " + " | ".join(f"{n} client{'s' if n > 1 else ''}" for n in counts)
                  + f" | {counts[-1] if counts else ''} vs 1 |",
                  "|---|" + "---|" * (len(counts) + 1)]
        for s in servers:
            if s.error and not s.figures:
                continue
            cells = [s.figures[n].cell() if n in s.figures else "–" for n in counts]
            scale = _ratio(s.figures[counts[-1]].median, s.figures[counts[0]].median) if len(s.figures) > 1 else "–"
            lines.append(f"| {s.name} | " + " | ".join(cells) + f" | {scale} |")
        failed += [s for s in servers if s.error]
    checks = goals(data)
    if checks:
        lines += ["", "| goal | compared | measured | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['compared']} | {g['value']} | {'✅' if g['met'] else '❌'} |" for g in checks]
    notes = [f"- {m}" for m in data["missing"]] + [f"- {getattr(x, 'label', getattr(x, 'name', ''))}: {x.error}"
                                                   for x in failed]
    if notes:
        lines += ["", "Left out or failed:", *notes]
    return "\n".join(lines) + "\n"


def to_json(data: dict[str, Any]) -> str:
    def target(t: Any) -> dict[str, Any]:
        return {"label": t.label, "engine": t.engine, "runtime": t.runtime, "weights": t.weights,
                "passes": t.passes, "perplexity": t.perplexity, "model_bytes": t.artifact_bytes, "error": t.error,
                "follows": t.follows.label if t.follows else None,
                "figures": {k: {"median": v.median, "values": v.values} for k, v in t.figures.items() if v.values}}

    return json.dumps({
        **{k: data[k] for k in ("command", "machine", "source", "runs", "tokens", "prompt", "serve_rounds",
                                "missing")},
        "targets": [target(t) for t in data["targets"]],
        "servers": [{"name": s.name, "error": s.error,
                     "figures": {str(n): {"median": f.median, "values": f.values} for n, f in s.figures.items()}}
                    for s in data["servers"]],
        "goals": goals(data),
    }, indent=1)


def from_json(text: str) -> dict[str, Any]:
    """A saved run (``to_json``) back as report data, to render it again."""
    from llmk.bench import Serving, Target

    raw = json.loads(text)
    targets = []
    for t in raw["targets"]:
        target = Target(t["engine"], t["runtime"], t["weights"], "", {}, passes=t["passes"],
                        artifact_bytes=t["model_bytes"], perplexity=t["perplexity"], error=t["error"])
        target.figures = {k: Figure(v["values"]) for k, v in t["figures"].items()}
        targets.append(target)
    for target, t in zip(targets, raw["targets"]):  # the rows a peer follows, for the overhead goal
        follows = t.get("follows")
        target.follows = next((x for x in targets if x.label == follows), None) if follows else None
    servers = [Serving(s["name"], {int(n): Figure(f["values"]) for n, f in s["figures"].items()}, s["error"])
               for s in raw["servers"]]
    return {**raw, "targets": targets, "servers": servers, "serve_rounds": raw.get("serve_rounds", 2)}


def chart(data: dict[str, Any], path: str | Path) -> None:
    """Decode speed of every row, and serving throughput by clients, as a PNG
    (needs matplotlib: ``pip install llmk[bench]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((t for t in data["targets"] if t.median("decode_tokens_per_s")),
                  key=lambda t: t.median("decode_tokens_per_s"))
    servers = [s for s in data["servers"] if s.figures]
    fig, axes = plt.subplots(1, 2 if servers else 1, figsize=(13 if servers else 8, 0.4 * len(rows) + 2),
                             squeeze=False)
    ax = axes[0][0]
    values = [t.median("decode_tokens_per_s") for t in rows]
    ax.barh([t.label for t in rows], values, color=["#1f77b4" if t.engine == "llmk" else "#aaaaaa" for t in rows])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("decode tokens/s, batch 1 (median)")
    ax.set_title("Batch-1 decode: llmk (blue) and peers (grey)")
    if servers:
        ax = axes[0][1]
        counts = sorted({n for s in servers for n in s.figures})
        width = 0.8 / len(servers)
        for i, s in enumerate(servers):
            ax.bar([c + (i - (len(servers) - 1) / 2) * width for c in range(len(counts))],
                   [s.figures[n].median if n in s.figures else 0 for n in counts], width,
                   label=s.name, color="#1f77b4" if s.name.startswith("llmk") else "#aaaaaa")
        ax.set_xticks(range(len(counts)), [f"{n} client{'s' if n > 1 else ''}" for n in counts])
        ax.set_ylabel("aggregate generated tokens/s (median)")
        ax.set_title("OpenAI-compatible servers under concurrent clients")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{data['source']} on {data['machine']['cpu']}, {data['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
