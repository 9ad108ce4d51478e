// Admin actions through the management API (/admin/*), enabled once the daemon accepts the
// token the user types. The token lives in this module's memory only: never in storage,
// never in the URL; a reload of the page forgets it.

import { $, api, el, fmtClock, setOptions } from "./util.js";

export function initAdmin() {
  let token = null;
  let served = [];  // the current versions of base models (swap and unload targets)

  const actions = $("#admin-actions");
  const status = $("#admin-status");

  function locked(message) {
    token = null;
    actions.disabled = true;
    $("#admin-forget").hidden = true;
    status.textContent = message;
  }

  $("#admin-token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("#admin-token");
    const given = input.value;
    input.value = "";
    if (!given) return;
    try {
      await api("GET", "admin/models", { token: given });
    } catch (error) {
      locked(`Refused (${error.status ?? "no answer"}): ${error.message}`);
      record("unlock", error);
      return;
    }
    token = given;
    actions.disabled = false;
    $("#admin-forget").hidden = false;
    status.textContent = "Token accepted: the admin actions are enabled (until you forget it or reload the page).";
    prefill();
  });
  $("#admin-forget").addEventListener("click", () => locked("Token forgotten: the admin actions are disabled."));

  // One line per action, newest first: what was asked and what the daemon answered.
  function record(what, error, result) {
    const line = error
      ? el("li", { class: "error" }, el("time", { text: fmtClock(Date.now() / 1000) }),
        `✗ ${what}: ${error.status ? `${error.status} ` : ""}${error.message}`)
      : el("li", { class: "ok" }, el("time", { text: fmtClock(Date.now() / 1000) }), `✓ ${what}: ${result}`);
    $("#admin-log").prepend(line);
  }

  // Run an admin call with the token; the form's buttons wait for its answer (a load can take minutes).
  async function run(form, what, method, path, body, describe) {
    const buttons = [...form.querySelectorAll("button")];
    buttons.forEach((b) => { b.disabled = true; });
    const busy = el("li", { class: "busy", text: `… ${what}` });
    $("#admin-log").prepend(busy);
    try {
      const result = await api(method, path, { token, body });
      record(what, null, describe(result));
    } catch (error) {
      record(what, error);
    } finally {
      busy.remove();
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  // The spec fields of a load or swap form: source, backend, device, passes, then any JSON extras.
  function spec(form) {
    const fields = { source: form.elements.source.value.trim() };
    for (const key of ["backend", "device"]) {
      const value = form.elements[key].value.trim();
      if (value) fields[key] = value;
    }
    fields.passes = form.elements.passes.value.split(",").map((p) => p.trim()).filter(Boolean);
    const extra = form.elements.extra.value.trim();
    if (extra) {
      let parsed;
      try {
        parsed = JSON.parse(extra);
      } catch (error) {
        throw new Error(`more fields: not valid JSON (${error.message})`);
      }
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
        throw new Error("more fields: give a JSON object, e.g. {\"max_batch_size\": 8}");
      }
      Object.assign(fields, parsed);
    }
    return fields;
  }

  const ready = (v) => `${v.name} v${v.version} ${v.state} on ${v.backend} (${v.device})`;

  function submit(id, handler) {
    const form = $(id);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!token) return;
      try {
        handler(form);
      } catch (error) {
        record(form.dataset.action, error);
      }
    });
  }

  submit("#admin-load", (form) => {
    const name = form.elements.name.value.trim();
    run(form, `load ${name}`, "POST", "admin/models", { name, ...spec(form) }, ready);
  });
  submit("#admin-swap", (form) => {
    const name = form.elements.model.value;
    run(form, `swap ${name}`, "PUT", `admin/models/${encodeURIComponent(name)}`, spec(form), ready);
  });
  submit("#admin-unload", (form) => {
    const name = form.elements.model.value;
    const button = form.querySelector("button");
    if (button.dataset.confirm !== name) {  // a second press confirms: unloading drops the model's traffic
      button.dataset.confirm = name;
      button.textContent = `Press again to unload ${name}`;
      setTimeout(() => { delete button.dataset.confirm; button.textContent = "Unload"; }, 5000);
      return;
    }
    delete button.dataset.confirm;
    button.textContent = "Unload";
    run(form, `unload ${name}`, "DELETE", `admin/models/${encodeURIComponent(name)}`, undefined,
      () => `${name} unloaded`);
  });
  submit("#admin-reload", (form) => {
    run(form, "reload the config", "POST", "admin/reload", undefined, (report) => {
      const changes = ["loaded", "swapped", "updated", "unloaded"].filter((k) => report[k].length)
        .map((k) => `${k} ${report[k].join(", ")}`);
      const failed = Object.entries(report.failed).map(([name, why]) => `${name} failed: ${why}`);
      return [...changes, ...failed].join("; ") || "no changes";
    });
  });

  // The swap form starts from the chosen model's current spec.
  function prefill() {
    const form = $("#admin-swap");
    const version = served.find((v) => v.name === form.elements.model.value);
    if (!version) return;
    form.elements.source.value = version.source;
    form.elements.backend.value = version.backend;
    form.elements.device.value = version.device;
    form.elements.passes.value = version.passes.join(", ");
  }
  $("#admin-swap").elements.model.addEventListener("change", prefill);

  function update(state) {
    served = state.models.filter((m) => m.current && m.state !== "failed" && !m.name.includes(":"));
    const names = served.map((m) => m.name);
    const swap = $("#admin-swap").elements.model;
    const before = swap.value;
    setOptions(swap, names);
    setOptions($("#admin-unload").elements.model, names);
    if (swap.value !== before || !$("#admin-swap").elements.source.value) prefill();
    if (!state.admin_enabled && token === null) {
      status.textContent = "The management API is off: start the daemon with a token in the environment " +
        "variable that server.admin_token_env names (LLMK_ADMIN_TOKEN by default).";
    }
  }

  return { update };
}
