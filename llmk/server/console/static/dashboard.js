// The dashboard: summary tiles, the history charts, one card per model, recent events.

import { drawChart } from "./charts.js";
import { $, el, fmtBytes, fmtClock, fmtPercent, fmtRate, fmtSeconds } from "./util.js";

const MIB = 1024 * 1024;
const GIB = 1024 * MIB;

export function initDashboard() {
  return { update };
}

function update(state) {
  tiles(state);
  charts(state);
  models(state);
  events(state);
}

function tiles(state) {
  const current = state.models.filter((m) => m.current && m.state === "ready");
  const sum = (key) => current.reduce((total, m) => total + (m[key] || 0), 0);
  const { used_bytes: used, budget_bytes: budget } = state.memory;
  $("#tile-models").textContent = String(current.length);
  $("#tile-memory").textContent = budget ? `${fmtBytes(used)} / ${fmtBytes(budget)}` : fmtBytes(used);
  $("#tile-memory-note").textContent = budget ? `${fmtPercent(used / budget)} of the budget` : "no memory budget set";
  $("#tile-throughput").textContent = fmtRate(sum("tokens_per_second"));
  $("#tile-running").textContent = `${sum("running")} / ${sum("queued")}`;
}

function charts(state) {
  const history = state.history;
  const now = state.time;
  // The minutes there is history for (one at least, up to what the daemon keeps).
  const since = history.length ? now - history[0].time : 0;
  const window = Math.min(state.history_seconds, Math.max(60, Math.ceil(since / 60) * 60));
  const points = (key, scale = 1) => history.map((h) => [h.time, h[key] === null ? null : h[key] * scale]);
  drawChart($("#chart-throughput"), {
    title: "Throughput", window, now, format: (v) => `${fmtRate(v)} tok/s`,
    series: [{ label: "generated tokens/s", cls: "s1", points: points("tokens_per_second") }],
  });
  drawChart($("#chart-latency"), {
    title: "Latency p50", window, now, format: (v) => fmtSeconds(v),
    series: [  // of the requests that finished between two samples: none, no point
      { label: "TTFT", cls: "s2", connect: true, points: points("ttft_p50_seconds") },
      { label: "TPOT", cls: "s3", connect: true, points: points("tpot_p50_seconds") },
    ],
  });
  // In GiB or MiB, whichever keeps the axis's round top a round number of bytes.
  const largest = Math.max(state.memory.budget_bytes || 0, ...history.map((h) => h.memory_used_bytes));
  const unit = largest >= GIB ? GIB : MIB;
  const memory = [{ label: "used", cls: "s4", points: points("memory_used_bytes", 1 / unit) }];
  if (state.memory.budget_bytes) {
    memory.push({ label: "budget", cls: "s5", dashed: true, points: points("memory_budget_bytes", 1 / unit) });
  }
  drawChart($("#chart-memory"), {
    title: "Memory", window, now, format: (v) => fmtBytes(v * unit), series: memory,
  });
}

function models(state) {
  const root = $("#models");
  const byName = new Map();
  for (const version of state.models) {
    if (!byName.has(version.name)) byName.set(version.name, []);
    byName.get(version.name).push(version);
  }
  const loading = state.readiness.status === "loading" ? state.readiness.missing || [] : [];
  if (!byName.size) {
    const text = loading.length
      ? `Loading ${loading.join(", ")}…`
      : "No models are loaded. Add them to the config file, or load one from the Admin tab.";
    root.replaceChildren(el("p", { class: "empty", text }));
    return;
  }
  const budget = state.memory.budget_bytes;
  root.replaceChildren(...[...byName.entries()].map(([name, versions]) => card(name, versions, budget)));
}

function card(name, versions, budget) {
  const current = versions.find((v) => v.current);
  const shown = current || versions[versions.length - 1];
  const failed = shown.state === "failed";
  const adapter = name.includes(":");
  const others = versions.filter((v) => v !== shown);
  const memory = shown.memory_bytes;
  const figure = (label, value, title) => el("div", { class: "figure", title },
    el("dt", { text: label }), el("dd", { text: value }));
  return el("article", { class: `card${failed ? " failed" : ""}`, "data-model": name, "aria-label": `model ${name}` },
    el("header", {},
      el("h3", { text: name }),
      adapter ? el("span", { class: "tag", text: "adapter" }) : null,
      el("span", { class: "tag version", text: `v${shown.version}` }),
      el("span", { class: `pill state-${shown.state}`, text: shown.state })),
    failed ? el("p", { class: "failure", text: `Failed to load: ${shown.failure}` }) : null,
    el("p", { class: "spec" },
      el("span", { class: "backend", text: `${shown.backend} · ${shown.device} · ${shown.dtype}` }),
      el("span", { text: shown.passes.length ? ` · passes: ${shown.passes.join(", ")}` : " · no passes" }),
      el("span", { class: "muted", text: ` · ${shown.task || "…"}` })),
    failed ? null : el("dl", { class: "figures" },
      figure("memory", budget ? `${fmtBytes(memory)} (${fmtPercent(memory / budget)})` : fmtBytes(memory)),
      figure("queue", String(shown.queued ?? 0)),
      figure("running", String(shown.running ?? 0)),
      figure("tokens/s", fmtRate(shown.tokens_per_second)),
      figure("TTFT p50/p95", `${fmtSeconds(shown.ttft_p50_seconds)} / ${fmtSeconds(shown.ttft_p95_seconds)}`),
      figure("TPOT p50/p95", `${fmtSeconds(shown.tpot_p50_seconds)} / ${fmtSeconds(shown.tpot_p95_seconds)}`),
      figure("prefix cache hits", fmtPercent(shown.prefix_cache_hit_rate),
        "share of prompt tokens found in the prefix cache"),
      figure("requests / errors", `${shown.requests} / ${shown.errors}`)),
    budget && !failed ? el("div", { class: "bar", role: "presentation" },
      barFill(Math.min(1, memory / budget))) : null,
    others.length ? el("ul", { class: "others" }, ...others.map((v) => el("li", {
      text: `v${v.version} ${v.state}${v.failure ? `: ${v.failure}` : ""}` +
        (v.running ? ` (${v.running} running)` : ""),
    }))) : null);
}

function barFill(ratio) {
  const fill = el("span");
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;  // CSSOM, allowed by the page's CSP
  return fill;
}

function events(state) {
  const root = $("#events");
  const recent = state.events.slice(-30).reverse();
  if (!recent.length) {
    root.replaceChildren(el("li", { class: "empty", text: "No lifecycle events yet." }));
    return;
  }
  root.replaceChildren(...recent.map((event) => el("li", { class: `event ${event.kind} ${event.state || ""}` },
    el("time", { text: fmtClock(event.time) }),
    el("strong", { text: `${event.model} v${event.version}` }),
    el("span", { text: describe(event) }))));
}

function describe(event) {
  if (event.kind === "alert") {
    return `alert ${event.metric} ${event.state}: ${event.value} (threshold ${event.threshold})`;
  }
  const d = event.detail || {};
  const why = d.error ? `: ${d.error}` : d.reason ? ` (${d.reason})` :
    d.seconds !== undefined ? ` in ${fmtSeconds(d.seconds)}${d.mode ? `, ${d.mode}` : ""}` : "";
  if (event.previous === event.state) {  // the first state of a version: what it loads
    return `${event.state}${d.source ? ` ${d.source}` : ""}${d.backend ? ` on ${d.backend}` : ""}`;
  }
  return `${event.previous} → ${event.state}${why}`;
}
