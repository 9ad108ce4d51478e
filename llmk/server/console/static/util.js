// Small helpers shared by the console's modules: DOM building, API calls, formatting.

export const $ = (selector, root = document) => root.querySelector(selector);

// el("li", {class: "x", text: "hi", onclick: f}, child, ...): one element, no innerHTML (no markup injection).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElementNS(
    attrs.svg ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml", tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "svg" || value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

// An answer the daemon refused: its HTTP status and the OpenAI-style error's message.
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code;
    }
  } catch {
    // not JSON: the status line says enough
  }
  return new ApiError(response.status, message, code);
}

// A JSON call to the daemon (paths are relative: the console works behind a path prefix too).
export async function api(method, path, { body, token, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// The same options in a <select>, keeping the user's choice while it is still offered.
export function setOptions(select, options, placeholder) {
  const keep = select.value;
  const values = options.map((o) => (typeof o === "string" ? { value: o, label: o } : o));
  const same = values.length + (placeholder ? 1 : 0) === select.options.length &&
    values.every((o, i) => select.options[i + (placeholder ? 1 : 0)].value === o.value);
  if (same) return;
  select.replaceChildren(
    ...(placeholder ? [el("option", { value: "", text: placeholder })] : []),
    ...values.map((o) => el("option", { value: o.value, text: o.label })));
  if (values.some((o) => o.value === keep)) select.value = keep;
}

export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 || value >= 100 ? 0 : 1)} ${units[unit]}`;
}

export function fmtSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms`;
  return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
}

export function fmtRate(value) {
  if (value === null || value === undefined) return "—";
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

export function fmtPercent(ratio) {
  if (ratio === null || ratio === undefined) return "—";
  return `${(ratio * 100).toFixed(ratio >= 0.1 ? 0 : 1)}%`;
}

export function fmtClock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}
