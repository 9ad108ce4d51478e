// The playground: chat with a model over /v1/chat/completions (streamed), and the
// cosine similarity of a few texts over /v1/embeddings.

import { $, el, errorOf, fmtSeconds, setOptions } from "./util.js";

export function initPlayground() {
  const history = [];  // the conversation so far: {role, content}
  let running = null;  // the AbortController of the answer being streamed

  const form = $("#chat-form");
  const modelSelect = $("#chat-model");
  const adapterSelect = $("#chat-adapter");
  const input = $("#chat-input");
  const log = $("#chat-log");
  let served = [];

  function update(state) {
    served = state.models.filter((m) => m.current && m.state === "ready" && m.task === "generate");
    const bases = served.filter((m) => !m.name.includes(":")).map((m) => m.name);
    setOptions(modelSelect, bases);
    adapters();
    $("#chat-empty").hidden = bases.length > 0;
    $("#chat-send").disabled = !bases.length || running !== null;
  }

  function adapters() {
    const prefix = `${modelSelect.value}:`;
    const names = served.filter((m) => m.name.startsWith(prefix)).map((m) => m.name.slice(prefix.length));
    setOptions(adapterSelect, names, "none (the base model)");
    adapterSelect.disabled = !names.length;
  }
  modelSelect.addEventListener("change", adapters);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (running === null && input.value.trim()) ask(input.value.trim());
  });
  input.addEventListener("keydown", (event) => {  // Ctrl+Enter (or Cmd+Enter) sends
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  $("#chat-stop").addEventListener("click", () => running?.abort());
  $("#chat-clear").addEventListener("click", () => {
    running?.abort();
    history.length = 0;
    log.replaceChildren();
  });

  function request(messages) {
    const body = {
      model: adapterSelect.value ? `${modelSelect.value}:${adapterSelect.value}` : modelSelect.value,
      messages, stream: true, stream_options: { include_usage: true },
      temperature: Number($("#chat-temperature").value),
      max_tokens: Number($("#chat-max-tokens").value),
    };
    const schema = $("#chat-schema").value.trim();
    if (schema) {
      let parsed;
      try {
        parsed = JSON.parse(schema);
      } catch (error) {
        throw new Error(`The JSON schema is not valid JSON: ${error.message}`);
      }
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: parsed, strict: true } };
    }
    return body;
  }

  async function ask(text) {
    const system = $("#chat-system").value.trim();
    const answer = el("div", { class: "bubble assistant", "aria-busy": "true" });
    const stats = el("p", { class: "stats", text: "waiting for the first token…" });
    let body;
    try {
      body = request([...(system ? [{ role: "system", content: system }] : []), ...history,
        { role: "user", content: text }]);
    } catch (error) {
      log.append(el("div", { class: "bubble error", role: "alert", text: error.message }));
      return;
    }
    history.push({ role: "user", content: text });
    input.value = "";
    log.append(el("div", { class: "bubble user", text }),
      el("div", { class: "turn" }, el("span", { class: "who", text: body.model }), answer, stats));
    running = new AbortController();
    $("#chat-send").disabled = true;
    $("#chat-stop").disabled = false;
    const started = performance.now();
    let first = null;
    let content = "";
    let usage = null;
    let finish = null;
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        signal: running.signal,
      });
      if (!response.ok) throw await errorOf(response);
      for await (const chunk of events(response)) {
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) {
          if (first === null) {
            first = performance.now();
            stats.textContent = `TTFT ${fmtSeconds((first - started) / 1000)} · streaming…`;
          }
          content += choice.delta.content;
          answer.textContent = content;
          log.scrollTop = log.scrollHeight;
        }
        finish = choice?.finish_reason ?? finish;
        usage = chunk.usage ?? usage;
      }
      history.push({ role: "assistant", content });
      stats.textContent = describe(started, first, performance.now(), usage, finish);
    } catch (error) {
      const stopped = error.name === "AbortError";
      answer.classList.add(stopped ? "stopped" : "error");
      if (!content) answer.textContent = stopped ? "(stopped)" : "";
      stats.textContent = stopped ? "stopped" : `Error${error.status ? ` ${error.status}` : ""}: ${error.message}`;
      if (!stopped) stats.setAttribute("role", "alert");
      history.pop();  // the question without its answer is not part of the conversation
    } finally {
      answer.removeAttribute("aria-busy");
      running = null;
      $("#chat-send").disabled = !modelSelect.value;
      $("#chat-stop").disabled = true;
      input.focus();
    }
  }

  return { update };
}

// The server-sent events of a streamed answer, as parsed JSON chunks.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value, { stream: !done });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
    if (done) return;
  }
}

function describe(started, first, ended, usage, finish) {
  const parts = [];
  if (first !== null) parts.push(`TTFT ${fmtSeconds((first - started) / 1000)}`);
  const tokens = usage?.completion_tokens;
  if (tokens > 1 && first !== null && ended > first) {
    parts.push(`${((tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (tokens !== undefined) parts.push(`${tokens} tokens`);
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

export function initEmbeddings() {
  const form = $("#embed-form");
  const select = $("#embed-model");

  function update(state) {
    const names = state.models.filter((m) => m.current && m.state === "ready" && m.task === "embed")
      .map((m) => m.name);
    setOptions(select, names);
    $("#embed-empty").hidden = names.length > 0;
    $("#embed-run").disabled = !names.length;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const texts = $("#embed-texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
    const out = $("#embed-result");
    if (texts.length < 2) {
      out.replaceChildren(el("p", { class: "error", role: "alert", text: "Give at least two texts, one a line." }));
      return;
    }
    $("#embed-run").disabled = true;
    const started = performance.now();
    try {
      const response = await fetch("v1/embeddings", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: select.value, input: texts }),
      });
      if (!response.ok) throw await errorOf(response);
      const body = await response.json();
      const vectors = body.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
      out.replaceChildren(matrix(texts, vectors),
        el("p", { class: "stats", text: `${vectors[0].length} dimensions · ${body.usage.prompt_tokens} tokens · ` +
          `${fmtSeconds((performance.now() - started) / 1000)}` }));
    } catch (error) {
      out.replaceChildren(el("p", { class: "error", role: "alert",
        text: `Error${error.status ? ` ${error.status}` : ""}: ${error.message}` }));
    } finally {
      $("#embed-run").disabled = !select.value;
    }
  });

  return { update };
}

function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

function matrix(texts, vectors) {
  const short = (t) => (t.length > 40 ? `${t.slice(0, 39)}…` : t);
  const cell = (value) => {
    const td = el("td", { text: value.toFixed(2) });
    td.style.setProperty("--sim", Math.max(0, value).toFixed(3));  // the cell's shade, read by the CSS
    return td;
  };
  return el("div", { class: "scroll" }, el("table", { class: "similarity" },
    el("caption", { text: "Cosine similarity" }),
    el("thead", {}, el("tr", {}, el("td"), ...texts.map((t, i) => el("th", { scope: "col", title: t, text: `${i + 1}` })))),
    el("tbody", {}, ...texts.map((t, i) => el("tr", {},
      el("th", { scope: "row", title: t, text: `${i + 1}. ${short(t)}` }),
      ...vectors.map((v) => cell(cosine(vectors[i], v))))))));
}
