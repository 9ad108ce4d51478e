// Small time-series line charts in plain SVG: no library, scaled to their container.

import { el } from "./util.js";

const W = 320;
const H = 120;
const PAD = { left: 6, right: 6, top: 18, bottom: 16 };

// series: [{label, cls, points: [[epochSeconds, value|null], ...], dashed, connect}]; a null breaks
// the line, unless `connect` (a point only where something was measured).
export function drawChart(figure, { title, series, window, now, format }) {
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null && v !== undefined);
  const top = niceMax(Math.max(0, ...values));
  const x = (t) => PAD.left + (W - PAD.left - PAD.right) * (1 - (now - t) / window);
  const y = (v) => H - PAD.bottom - (H - PAD.top - PAD.bottom) * (top ? v / top : 0);
  const latest = series.map((s) => {
    const last = [...s.points].reverse().find((p) => p[1] !== null && p[1] !== undefined);
    return `${s.label} ${last ? format(last[1]) : "no data"}`;
  }).join(", ");

  const svg = el("svg", {
    svg: true, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${latest}`,
    preserveAspectRatio: "xMidYMid meet",
  });
  svg.append(el("line", { svg: true, x1: PAD.left, x2: W - PAD.right, y1: y(0), y2: y(0), class: "axis" }));
  svg.append(el("line", { svg: true, x1: PAD.left, x2: W - PAD.right, y1: y(top), y2: y(top), class: "grid" }));
  svg.append(el("text", { svg: true, x: PAD.left, y: PAD.top - 5, class: "tick", text: format(top) }));
  svg.append(el("text", { svg: true, x: PAD.left, y: H - 3, class: "tick", text: `−${Math.round(window / 60)} min` }));
  svg.append(el("text", { svg: true, x: W - PAD.right, y: H - 3, class: "tick end", text: "now" }));
  for (const s of series) {
    const measured = (p) => p[1] !== null && p[1] !== undefined;
    const shown = s.points.filter((p) => now - p[0] <= window && (!s.connect || measured(p)));
    for (const run of runs(shown)) {
      const d = run.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
      if (run.length === 1) {
        svg.append(el("circle", { svg: true, cx: x(run[0][0]), cy: y(run[0][1]), r: 1.8, class: `dot ${s.cls}` }));
      } else {
        svg.append(el("path", { svg: true, d, class: `line ${s.cls}${s.dashed ? " dashed" : ""}` }));
      }
    }
  }
  const legend = el("figcaption", {},
    el("span", { class: "chart-title", text: title }),
    ...series.map((s) => el("span", { class: `legend ${s.cls}` }, el("i", { "aria-hidden": "true" }), s.label)));
  figure.replaceChildren(legend, svg);
}

// Consecutive points with a value: a gap (null) breaks the line.
function runs(points) {
  const out = [];
  let current = [];
  for (const p of points) {
    if (p[1] === null || p[1] === undefined) {
      if (current.length) out.push(current);
      current = [];
    } else {
      current.push(p);
    }
  }
  if (current.length) out.push(current);
  return out;
}

// 1, 2 or 5 times a power of ten, at least the value: a readable top of the axis.
function niceMax(value) {
  if (!(value > 0)) return 0;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}
