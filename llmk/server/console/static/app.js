// The console's entry point: tabs, and the poll of /console/state that feeds every section.

import { initAdmin } from "./admin.js";
import { initDashboard } from "./dashboard.js";
import { initEmbeddings, initPlayground } from "./playground.js";
import { $, api, fmtClock } from "./util.js";

const POLL_MS = 2000;
const HIDDEN_POLL_MS = 10000;  // a background tab still notices a restart, at a lower cost

const sections = [initDashboard(), initPlayground(), initEmbeddings(), initAdmin()];

// -- tabs (WAI-ARIA: arrows, Home and End move between tabs; the URL's #hash keeps the one open)
const tabs = [...document.querySelectorAll('[role="tab"]')];

function select(tab, focus = false) {
  for (const other of tabs) {
    const chosen = other === tab;
    other.setAttribute("aria-selected", String(chosen));
    other.tabIndex = chosen ? 0 : -1;
    $(`#${other.getAttribute("aria-controls")}`).hidden = !chosen;
  }
  if (focus) tab.focus();
  const hash = `#${tab.id.replace(/^tab-/, "")}`;
  if (location.hash !== hash) history.replaceState(null, "", hash);
}

for (const tab of tabs) {
  tab.addEventListener("click", () => select(tab));
  tab.addEventListener("keydown", (event) => {
    const i = tabs.indexOf(tab);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (next === undefined) return;
    event.preventDefault();
    select(tabs[(next + tabs.length) % tabs.length], true);
  });
}
const fromHash = () => tabs.find((t) => `#${t.id.replace(/^tab-/, "")}` === location.hash) || tabs[0];
window.addEventListener("hashchange", () => select(fromHash()));
select(fromHash());

// -- the daemon's state, polled

// Live regions are re-announced when their text is set, even to the same words: set changes only.
function say(node, text, className) {
  if (node.textContent !== text) node.textContent = text;
  if (className !== undefined && node.className !== className) node.className = className;
}

function banner(state) {
  const readiness = state.readiness;
  say($("#daemon-status"), readiness.status, `pill daemon-${readiness.status}`);
  const box = $("#banner");
  let message = "";
  if (readiness.status === "draining") {
    message = "The daemon is draining: running requests finish, new ones are refused, then it stops.";
  } else if (readiness.status === "stalled") {
    message = `A model's engine is stuck: ${Object.keys(readiness.stalled).join(", ")}. ` +
      "Its requests fail; only a restart of the daemon ends it.";
  } else if (readiness.status === "loading") {
    const failed = Object.entries(readiness.failed || {});
    message = failed.length
      ? `Failed to load: ${failed.map(([name, why]) => `${name} (${why})`).join("; ")}`
      : `Loading: ${readiness.missing.join(", ")}…`;
  }
  box.hidden = !message;
  say(box, message, readiness.status === "loading" && !Object.keys(readiness.failed || {}).length ? "info" : "alert");
}

async function poll() {
  let state = null;
  try {
    state = await api("GET", "console/state");
  } catch (error) {
    say($("#daemon-status"), "unreachable", "pill daemon-unreachable");
    $("#banner").hidden = false;
    say($("#banner"), `Cannot read the daemon's state (${error.message}); retrying.`, "alert");
  }
  if (state !== null) {
    $("#llmk-version").textContent = state.llmk_version;
    $("#updated").textContent = `updated ${fmtClock(state.time)}`;
    banner(state);
    for (const section of sections) {
      try {
        section.update(state);
      } catch (error) {
        console.error("console: a section failed to render", error);  // a bug: the others still update
      }
    }
  }
  setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
}

poll();
