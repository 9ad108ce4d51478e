"""The benchmark report: markdown tables with ratios, the goals, JSON, a chart."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmk.bench import Serving

#: The goals the suite reports against (issue 7).
DECODE_GOAL = 1.0  # best llmk configuration × the fastest peer, batch-1 decode
OVERHEAD_GOAL = 0.05  # llmk's slowdown against the raw runtime on the same files
FIRST_TOKEN_GOAL = 1.0  # seconds from the start of a cached load to the first token
#: The serving goals (issue "Engine v2"), llmk serve against llama.cpp's server in the same run.
THROUGHPUT_GOAL = 1.3  # aggregate tokens/s × the peer server's ...
THROUGHPUT_GOAL_CLIENTS = (8, 16, 32)  # ... at these client counts (and rising from 8 to 16)
TTFT_GOAL = 1.0  # TTFT p50 × the peer server's, at every client count
MAX_WAIT_GOAL = 1.0  # seconds a running stream waits for its next token while a long prompt is prefilled
PREFIX_GOAL = 0.2  # a repeated prefix's TTFT × the first request's


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
    return found + serving_goals(data["servers"])


def server_pair(servers: list[Serving]) -> tuple[Serving | None, Serving | None]:
    """llmk serve and the peer server it is compared with (the first of each that
    has figures); either may be None."""
    measured = [s for s in servers if s.figures]
    ours = next((s for s in measured if s.name.startswith("llmk")), None)
    rival = next((s for s in measured if not s.name.startswith("llmk")), None)
    return ours, rival


def serving_goals(servers: list[Serving]) -> list[dict[str, Any]]:
    """The Engine v2 goals, each with the ratio measured in the same run."""
    ours, rival = server_pair(servers)
    if ours is None:
        return []
    found: list[dict[str, Any]] = []
    peer = rival.name if rival else ""
    if rival:
        for n in THROUGHPUT_GOAL_CLIENTS:
            mine, theirs = ours.median(f"tokens_per_s@{n}"), rival.median(f"tokens_per_s@{n}")
            if mine and theirs:
                found.append({"goal": f"Engine v2: {n}-client aggregate tokens/s ≥ {THROUGHPUT_GOAL}× the peer server",
                              "compared": f"{ours.name} vs {peer}: {mine:.1f} vs {theirs:.1f} tokens/s",
                              "value": f"{mine / theirs:.2f}×", "met": mine / theirs >= THROUGHPUT_GOAL})
    low, high = THROUGHPUT_GOAL_CLIENTS[:2]
    eight, sixteen = ours.median(f"tokens_per_s@{low}"), ours.median(f"tokens_per_s@{high}")
    if eight and sixteen:
        theirs = _ratio(rival.median(f"tokens_per_s@{high}"), rival.median(f"tokens_per_s@{low}")) if rival else "–"
        found.append({"goal": f"Engine v2: aggregate tokens/s rises from {low} to {high} clients",
                      "compared": f"{ours.name}: {eight:.1f} → {sixteen:.1f} tokens/s (peer server: {theirs})",
                      "value": f"{sixteen / eight:.2f}×", "met": sixteen > eight})
    if rival:
        for n in ours.clients:
            mine, theirs = ours.median(f"ttft_p50_s@{n}"), rival.median(f"ttft_p50_s@{n}")
            if mine and theirs:
                found.append({"goal": f"Engine v2: TTFT p50 ≤ the peer server's, {n} client{'s' if n > 1 else ''}",
                              "compared": f"{ours.name} vs {peer}: {mine * 1000:.0f} vs {theirs * 1000:.0f} ms",
                              "value": f"{mine / theirs:.2f}×", "met": mine / theirs <= TTFT_GOAL})
    wait = ours.figures.get("max_wait_s")
    if wait and wait.values:
        theirs = f"; peer server: {rival.median('max_wait_s'):.2f} s" if rival and rival.median("max_wait_s") else ""
        found.append({"goal": "Engine v2: no running stream waits > 1 s for its next token while a 4,000-token "
                              "prompt is prefilled",
                      "compared": f"{ours.name}: longest wait, median of runs (worst {max(wait.values):.2f} s{theirs})",
                      "value": f"{wait.median:.2f} s", "met": wait.median <= MAX_WAIT_GOAL})
    ratio = ours.median("prefix_ratio")
    if ratio:
        theirs = f"; peer server: {rival.median('prefix_ratio'):.2f}×" if rival and rival.median("prefix_ratio") else ""
        found.append({"goal": "Engine v2: a repeated 1,500-token prefix's TTFT ≤ 0.2× the first request's",
                      "compared": f"{ours.name}: {ours.median('prefix_second_ttft_s') * 1000:.0f} vs "
                                  f"{ours.median('prefix_first_ttft_s') * 1000:.0f} ms{theirs}",
                      "value": f"{ratio:.2f}×", "met": ratio <= PREFIX_GOAL})
    return found


def markdown(data: dict[str, Any]) -> str:
    info = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        f"Command: `{data['command']}`  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, Python {info['python']}; {versions}  ",
    ]
    if data["targets"]:
        lines += _decode_table(data)
    if any(s.figures for s in data["servers"]):
        lines += _serving_tables(data)
    checks = goals(data)
    if checks:
        lines += ["", "| goal | compared | measured | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['compared']} | {g['value']} | {'✅' if g['met'] else '❌'} |" for g in checks]
    failed = [t for t in data["targets"] if t.error] + [s for s in data["servers"] if s.error]
    notes = [f"- {m}" for m in data["missing"]] + [f"- {getattr(x, 'label', getattr(x, 'name', ''))}: {x.error}"
                                                   for x in failed]
    if notes:
        lines += ["", "Left out or failed:", *notes]
    return "\n".join(lines) + "\n"


def _decode_table(data: dict[str, Any]) -> list[str]:
    info = data["machine"]
    lines = [
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
    return lines


def _short(server: Serving) -> str:
    return server.name.split(" (")[0]


def _side_by_side(pair: list[Serving], figure: str, digits: int = 1, scale: float = 1.0,
                  ratio: bool = True) -> list[str]:
    """The figure's cell for each server, then the first's median ÷ the second's."""
    cells = [s.figures.get(figure, Figure()).cell(digits, scale) for s in pair]
    if len(pair) == 2:
        cells.append(_ratio(pair[0].median(figure), pair[1].median(figure)) if ratio else "–")
    return cells


#: The rows of the long-prompt and shared-prefix table: label, figure, digits, scale, with a ratio.
SERVING_ROWS = (
    ("longest wait for a token while the long prompt is prefilled (s)", "max_wait_s", 2, 1.0, True),
    ("median wait for a token before it arrived (ms)", "steady_wait_s", 0, 1000, True),
    ("the long request's TTFT (s)", "long_ttft_s", 2, 1.0, True),
    ("answers streaming during that prefill", "streams", 0, 1.0, False),
    ("shared prefix: first request's TTFT (ms)", "prefix_first_ttft_s", 0, 1000, True),
    ("shared prefix: second request's TTFT (ms)", "prefix_second_ttft_s", 0, 1000, True),
    ("shared prefix: second TTFT ÷ first", "prefix_ratio", 2, 1.0, True),
)


def _serving_tables(data: dict[str, Any]) -> list[str]:
    """Load (tokens/s and TTFT by clients), then the long prompt and the shared
    prefix, each where measured: llmk serve and the peer server side by side,
    with their ratio."""
    pair = [s for s in server_pair(data["servers"]) if s]
    names = [_short(s) for s in pair]
    versus = [f"{names[0]} ÷ {names[1]}"] if len(pair) == 2 else []
    measured = {k for s in pair for k in s.figures}
    streamed = any(not k.startswith("tokens_per_s@") for k in measured)  # runs saved before: tokens/s alone
    counts = sorted({n for s in pair for n in s.clients})
    lines = ["", f"Serving: {'streaming chat ' if streamed else ''}completions, greedy, through the `openai` client; "
                 f"median (min–max) of {data['runs']} runs, the servers started fresh and their runs interleaved."]
    if counts:
        lines[-1] += (f" By clients: each client runs {data['serve_rounds']} requests of {data['tokens']} tokens back "
                      "to back. Aggregate tokens/s: every generated token over the wall time from the first request "
                      "sent to the last token received." + (" TTFT: from sending a request to its first token, p50 "
                                                             "and p95 of the run's requests." if streamed else ""))
    lines += [f"- {s.name}: `{s.command}`" for s in pair if s.command]
    if counts:
        columns = [("tokens/s", "tokens_per_s", 1, 1.0)]
        if streamed:  # runs saved before the serving figures have no TTFT
            columns += [("TTFT p50 (ms)", "ttft_p50_s", 0, 1000), ("TTFT p95 (ms)", "ttft_p95_s", 0, 1000)]
        header = ["clients"] + [h for metric, *_ in columns for h in [f"{n} {metric}" for n in names] + versus]
        lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for n in counts:
            cells = [str(n)] + [c for _, figure, digits, scale in columns
                                for c in _side_by_side(pair, f"{figure}@{n}", digits, scale)]
            lines.append("| " + " | ".join(cells) + " |")
    rows = [row for row in SERVING_ROWS if row[1] in measured]
    if not rows:
        return lines
    from llmk.bench.serving import STREAMS

    def size(figure: str, nominal: str) -> str:
        return next((f"{s.median(figure):.0f}" for s in pair if s.median(figure)), nominal)

    caption = []
    if "long_ttft_s" in measured:
        caption.append(f"Long prompt: {STREAMS} clients streaming (each sends its next request when an answer ends), "
                       f"then a request with a {size('long_prompt_tokens', '~4,000')}-token prompt arrives; the "
                       "longest wait between two tokens of any of those streams from its arrival to its first token.")
    if "prefix_ratio" in measured:
        caption.append(f"Shared prefix: a {size('prefix_prompt_tokens', '~1,500')}-token prompt (a long system "
                       "prompt) sent twice, one request after the other, with different questions.")
    lines += ["", " ".join(caption) + " Median (min–max) of the runs.", "",
              "| figure | " + " | ".join(names + versus) + " |", "|---" * (len(pair) + len(versus) + 1) + "|"]
    for label, figure, digits, scale, ratio in rows:
        lines.append(f"| {label} | " + " | ".join(_side_by_side(pair, figure, digits, scale, ratio)) + " |")
    return lines


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
        "servers": [{"name": s.name, "command": s.command, "error": s.error,
                     "figures": {k: {"median": f.median, "values": f.values} for k, f in s.figures.items() if f.values}}
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
    servers = [Serving(s["name"], {_figure_name(k): Figure(f["values"]) for k, f in s["figures"].items()},
                       s["error"], s.get("command", "")) for s in raw["servers"]]
    return {**raw, "targets": targets, "servers": servers, "serve_rounds": raw.get("serve_rounds", 2)}


def _figure_name(key: str) -> str:
    """A server figure's name; runs saved before the serving figures keyed
    aggregate tokens/s by the client count alone."""
    return f"tokens_per_s@{key}" if key.isdigit() else key


def chart(data: dict[str, Any], path: str | Path) -> None:
    """Decode speed of every row, and serving throughput by clients, as a PNG
    (needs matplotlib: ``pip install llmk[bench]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((t for t in data["targets"] if t.median("decode_tokens_per_s")),
                  key=lambda t: t.median("decode_tokens_per_s"))
    servers = [s for s in data["servers"] if s.clients]
    panels = bool(rows) + bool(servers)
    size = (6.5 * panels if panels > 1 else 8, 0.4 * len(rows) + 2 if rows else 5)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=size, squeeze=False)
    if rows:
        ax = axes[0][0]
        values = [t.median("decode_tokens_per_s") for t in rows]
        ax.barh([t.label for t in rows], values, color=["#1f77b4" if t.engine == "llmk" else "#aaaaaa" for t in rows])
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
        ax.set_xlabel("decode tokens/s, batch 1 (median)")
        ax.set_title("Batch-1 decode: llmk (blue) and peers (grey)")
    if servers:
        ax = axes[0][-1]
        counts = sorted({n for s in servers for n in s.clients})
        width = 0.8 / len(servers)
        for i, s in enumerate(servers):
            ax.bar([c + (i - (len(servers) - 1) / 2) * width for c in range(len(counts))],
                   [s.median(f"tokens_per_s@{n}") or 0 for n in counts], width,
                   label=s.name, color="#1f77b4" if s.name.startswith("llmk") else "#aaaaaa")
        ax.set_xticks(range(len(counts)), [f"{n} client{'s' if n > 1 else ''}" for n in counts])
        ax.set_ylabel("aggregate generated tokens/s (median)")
        ax.set_title("OpenAI-compatible servers under concurrent clients")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{data['source']} on {data['machine']['cpu']}, {data['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
