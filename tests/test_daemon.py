"""The daemon's operator side, on real ``llmk serve`` processes: the management
API, reload (file change, SIGHUP, bad files), SIGTERM drain, a full queue,
client disconnects and request timeouts.

The management tests run real tiny models. The scheduling tests need a model
whose pace the test controls, so they serve llmk's fake backend (installed into
the daemon as a third-party plugin package would be), with a fixed delay per
decode step.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ServeProcess, wait_for

TOKEN_ENV = "LLMK_TEST_ADMIN_TOKEN"
TOKEN = "s3cret-token"


def start(directory: Path, config: str, site: Path | None = None, token: str | None = None,
          **kwargs) -> tuple[ServeProcess, Path]:
    path = directory / "llmk.yaml"
    path.write_text(config)
    env = {}
    if site is not None:
        import os

        env["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    if token is not None:
        env[TOKEN_ENV] = token
    return ServeProcess(["--cache-dir", str(directory / "cache"), "serve", "--config", str(path)], env=env,
                        **kwargs), path


def admin(daemon: ServeProcess, method: str, path: str, token: str | None = TOKEN, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.request(method, daemon.url + path, headers=headers, timeout=300, **kwargs)


def served(daemon: ServeProcess) -> list[str]:
    return sorted(m.id for m in daemon.client().models.list())


def current(daemon: ServeProcess, name: str) -> dict:
    return next(v for v in admin(daemon, "GET", "/admin/models").json()["data"] if v["name"] == name and v["current"])


def metric(daemon: ServeProcess, name: str, **labels: str) -> float:
    """The value of one sample on /metrics (0 when absent)."""
    text = httpx.get(daemon.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- management API ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def managed(tiny_llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("admin")
    daemon, _ = start(directory, f"""
server: {{port: 0, admin_token_env: {TOKEN_ENV}, model_roots: ["{tmp_path_factory.getbasetemp()}"]}}
plugins: {{autoload: false}}
models:
  chat: {{source: {tiny_llama}, backend: torch}}
""", token=TOKEN)
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic czNjcmV0LXRva2Vu", f"Token {TOKEN}"])
def test_admin_refuses_a_missing_or_wrong_token(managed, header):
    for method, path in [("GET", "/admin/models"), ("POST", "/admin/models"), ("PUT", "/admin/models/chat"),
                         ("DELETE", "/admin/models/chat"), ("POST", "/admin/reload")]:
        response = httpx.request(method, managed.url + path, headers={"Authorization": header} if header else {})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_token"
    assert served(managed) == ["chat"]  # nothing was unloaded


def test_admin_lists_loads_swaps_and_unloads(managed, tiny_llama, tiny_bert, tmp_path):
    (chat,) = admin(managed, "GET", "/admin/models").json()["data"]
    assert (chat["name"], chat["state"], chat["backend"], chat["current"]) == ("chat", "ready", "torch", True)

    # load
    response = admin(managed, "POST", "/admin/models", json={"name": "embed", "source": str(tiny_bert)})
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "ready"
    assert served(managed) == ["chat", "embed"]
    assert len(managed.client().embeddings.create(model="embed", input="hi").data) == 1
    taken = admin(managed, "POST", "/admin/models", json={"name": "embed", "source": str(tiny_bert)})
    assert taken.status_code == 409 and "PUT /admin/models/embed" in taken.json()["error"]["message"]

    # hot-swap: the same greedy text from another backend, and a new version number
    ask = {"model": "chat", "prompt": "Once upon", "max_tokens": 8, "temperature": 0}
    before = managed.client().completions.create(**ask).choices[0].text
    response = admin(managed, "PUT", "/admin/models/chat", json={"source": str(tiny_llama), "backend": "onnxruntime"})
    assert response.status_code == 200, response.text
    swapped = response.json()
    assert (swapped["backend"], swapped["version"]) == ("onnxruntime", chat["version"] + 1)
    assert managed.client().completions.create(**ask).choices[0].text == before

    # a swap to a corrupt model fails with the reason, and the old version keeps serving
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in Path(tiny_llama).iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    response = admin(managed, "PUT", "/admin/models/chat", json={"source": str(broken), "backend": "torch"})
    assert 400 <= response.status_code < 600 and response.status_code != 404, response.text
    assert "model.safetensors" in response.json()["error"]["message"]
    assert current(managed, "chat")["version"] == swapped["version"]
    assert managed.client().completions.create(**ask).choices[0].text == before

    # unload
    assert admin(managed, "DELETE", "/admin/models/embed").json() == {"id": "embed", "object": "model",
                                                                       "deleted": True}
    assert served(managed) == ["chat"]
    assert admin(managed, "DELETE", "/admin/models/embed").status_code == 404
    assert admin(managed, "PUT", "/admin/models/nope", json={"source": str(tiny_llama)}).status_code == 404


def test_admin_loads_paths_only_under_the_model_roots(managed, tmp_path_factory):
    inside = tmp_path_factory.getbasetemp() / "no-such-model"
    response = admin(managed, "POST", "/admin/models", json={"name": "x", "source": str(inside)})
    assert response.status_code == 400 and str(inside) in response.json()["error"]["message"]
    answers = []
    for outside in ("/etc", "/no/such/model", "/etc/passwd", f"{tmp_path_factory.getbasetemp()}/../outside"):
        for method, path, body in [("POST", "/admin/models", {"name": "x", "source": outside}),
                                   ("PUT", "/admin/models/chat", {"source": outside})]:
            response = admin(managed, method, path, json=body)
            assert response.status_code == 403, response.text
            answers.append(response.json()["error"]["message"].replace(outside, "PATH"))
    assert len(set(answers)) == 1 and "model_roots" in answers[0]  # existence is not told apart
    assert served(managed) == ["chat"]


@pytest.mark.parametrize("body, problem", [
    ({"source": "/no/such/model"}, "name"),
    ({"name": "x", "source": "builtin:smollm2", "backend": "nope"}, "unknown backend 'nope'"),
    ({"name": "x", "source": "builtin:smollm2", "max_batch_size": 0}, "max_batch_size"),
    ({"name": "a/b", "source": "builtin:smollm2"}, "name"),
])
def test_admin_refuses_a_bad_load_and_keeps_serving(managed, body, problem):
    response = admin(managed, "POST", "/admin/models", json=body)
    assert response.status_code == 400, response.text
    assert problem in response.json()["error"]["message"]
    assert "x" not in served(managed)
    assert managed.client().completions.create(model="chat", prompt="Hi", max_tokens=2).choices


# -- reload ----------------------------------------------------------------------------


def fake_models(**models: dict) -> str:
    lines = [f"  {name}: {json.dumps({'backend': 'fake', 'source': f'fake:{name}', **fields})}"
             for name, fields in models.items()]
    return "\n".join(lines)


def test_a_changed_file_is_reconciled_and_a_bad_one_changes_nothing(fake_site, tmp_path):
    head = f"server: {{port: 0, admin_token_env: {TOKEN_ENV}}}\nmodels:\n"
    daemon, path = start(tmp_path, head + fake_models(keep={}, change={}, drop={}), site=fake_site, token=TOKEN)
    try:
        change = current(daemon, "change")
        ask = {"model": "change", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        before = daemon.client().completions.create(**ask).choices[0].text
        mark = len(daemon.lines)

        path.write_text(head + fake_models(keep={}, change={"options": {"salt": 5}}, new={}))
        daemon.wait_for_line(r"reloaded \(file\)", timeout=60, start=mark)
        assert served(daemon) == ["change", "keep", "new"]
        assert current(daemon, "change")["version"] == change["version"] + 1
        assert daemon.client().completions.create(**ask).choices[0].text != before  # the new spec serves
        assert current(daemon, "keep")["version"] == 1  # untouched
        assert metric(daemon, "llmk_config_reloads_total", result="ok") == 1

        mark = len(daemon.lines)
        path.write_text(head + fake_models(keep={"max_batch_size": 0}, other={}))
        line = daemon.wait_for_line(r"reload \(file\) refused.*", timeout=60, start=mark).group(0)
        assert "models.keep.max_batch_size" in line and "greater than or equal to 1" in line
        assert served(daemon) == ["change", "keep", "new"]  # nothing changed
        assert metric(daemon, "llmk_config_reloads_total", result="invalid") == 1

        mark = len(daemon.lines)
        path.write_text("models: [this is: not: yaml")
        assert "not valid YAML" in daemon.wait_for_line(r"reload \(file\) refused.*", timeout=60, start=mark).group(0)
        assert served(daemon) == ["change", "keep", "new"]
    finally:
        daemon.stop()


def test_sighup_and_the_admin_endpoint_reload(fake_site, tmp_path):
    head = f"server: {{port: 0, watch_config: false, admin_token_env: {TOKEN_ENV}}}\nmodels:\n"
    daemon, path = start(tmp_path, head + fake_models(a={}), site=fake_site, token=TOKEN)
    try:
        path.write_text(head + fake_models(a={}, b={}))
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_line(r"reloaded \(SIGHUP\)", timeout=60, start=mark)
        assert served(daemon) == ["a", "b"]

        path.write_text(head + fake_models(b={"pinned": True}))
        report = admin(daemon, "POST", "/admin/reload")
        assert report.status_code == 200, report.text
        assert (report.json()["unloaded"], report.json()["updated"]) == (["a"], ["b"])
        assert served(daemon) == ["b"] and current(daemon, "b")["pinned"] and current(daemon, "b")["version"] == 1

        path.write_text(head.replace("port: 0", "port: 1") + fake_models(b={"pinned": True}, c={"device": 7}))
        refused = admin(daemon, "POST", "/admin/reload")
        assert refused.status_code == 400 and "models.c.device" in refused.json()["error"]["message"]
        path.write_text(head.replace("port: 0", "port: 1") + fake_models(b={"pinned": True}))
        assert admin(daemon, "POST", "/admin/reload").json()["restart_required"] == ["server.port"]
        assert served(daemon) == ["b"]
    finally:
        daemon.stop()


# -- scheduling: a full queue, disconnects, timeouts, drain -------------------------------------


@pytest.fixture(scope="module")
def slow(fake_site, tmp_path_factory):
    """One model that decodes a token every 20 ms, one sequence at a time, no queue."""
    daemon, _ = start(tmp_path_factory.mktemp("slow"), "server: {port: 0, max_queue: 0}\nmodels:\n" + fake_models(
        slow={"options": {"delay": 0.02}, "max_batch_size": 1}), site=fake_site)
    yield daemon
    daemon.stop()


def first_chunks(lines: Iterator[str], count: int) -> list[str]:
    """Read ``count`` SSE data lines from an open streaming response's ``iter_lines()``."""
    data = []
    for line in lines:
        if line.startswith("data: "):
            data.append(line)
            if len(data) == count:
                return data
    raise AssertionError(f"the stream ended after {data}")


def test_a_full_queue_answers_429_with_retry_after(slow):
    body = {"model": "slow", "prompt": "Hi", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", slow.url + "/v1/completions", json=body, timeout=60) as busy:
        lines = busy.iter_lines()
        first_chunks(lines, 1)  # admitted: the only batch slot is taken, and the queue holds none
        refused = httpx.post(slow.url + "/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        rest = [line for line in lines if line.startswith("data: ")]
        assert len(rest) == 60 and rest[-1] == "data: [DONE]"  # the busy stream was not disturbed
    done = httpx.post(slow.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3


def test_a_client_that_goes_away_cancels_its_generation(slow):
    before = metric(slow, "llmk_tokens_total", model="slow", kind="completion")
    body = {"model": "slow", "prompt": "Hi", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", slow.url + "/v1/completions", json=body, timeout=60) as response:
        first_chunks(response.iter_lines(), 3)
    # 2000 tokens take 40 s at this pace; the generation must end now instead.
    wait_for(lambda: metric(slow, "llmk_requests_total", model="slow", result="cancelled") == 1, timeout=10)
    assert metric(slow, "llmk_requests_running", model="slow") == 0
    generated = metric(slow, "llmk_tokens_total", model="slow", kind="completion") - before
    assert 3 <= generated < 200
    # and the slot is free again
    assert slow.client().completions.create(model="slow", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_admin_is_off_without_a_token(slow):
    response = httpx.get(slow.url + "/admin/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 403 and "LLMK_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_metrics_report_requests_tokens_latencies_and_lifecycle(slow):
    slow.client().completions.create(model="slow", prompt="Hi", max_tokens=4, temperature=0)
    assert metric(slow, "llmk_http_requests_total", model="slow", endpoint="/v1/completions", status="200") >= 1
    httpx.get(slow.url + "/v1/no-such-path")
    assert metric(slow, "llmk_http_requests_total", model="", endpoint="unmatched", status="404") == 1
    assert "no-such-path" not in httpx.get(slow.url + "/metrics").text  # labels never hold raw paths
    assert metric(slow, "llmk_time_to_first_token_seconds_count", model="slow") >= 1
    assert metric(slow, "llmk_time_per_output_token_seconds_count", model="slow") >= 1
    assert metric(slow, "llmk_queue_wait_seconds_count", model="slow") >= 1
    assert metric(slow, "llmk_requests_total", model="slow", result="length") >= 1
    assert metric(slow, "llmk_model_loads_total", result="ok") == 1
    assert metric(slow, "llmk_model_load_seconds_count", model="slow") == 1
    assert metric(slow, "llmk_model_state", model="slow", version="1", state="ready") == 1
    assert metric(slow, "llmk_queue_depth", model="slow") == 0
    assert "llmk_model_memory_bytes{" in httpx.get(slow.url + "/metrics").text


def test_one_log_event_per_request(slow):
    mark = len(slow.lines)
    for _ in range(3):
        slow.client().models.retrieve("slow")
    httpx.post(slow.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    wait_for(lambda: sum("http.request" in line for line in slow.lines[mark:]) >= 4)
    time.sleep(0.2)
    events = [line for line in slow.lines[mark:] if "http.request" in line]
    assert len(events) == 4
    assert sum("endpoint=/v1/models/{name}" in e and "status=200" in e for e in events) == 3
    assert "status=404" in events[3] and "endpoint=/v1/completions" in events[3]


def test_no_hidden_queue_stands_in_front_of_max_queue(fake_site, tmp_path):
    # Two in the batch and three queued are accepted; the rest are refused at once, not parked
    # in a thread pool. Each accepted request needs ~4 s, so all ten arrive while they run.
    daemon, _ = start(tmp_path, "server: {port: 0, max_queue: 3}\nmodels:\n" + fake_models(
        slow={"options": {"delay": 0.02}, "max_batch_size": 2}), site=fake_site)
    try:
        body = {"model": "slow", "prompt": "Hi", "max_tokens": 200, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: httpx.post(daemon.url + "/v1/completions", json=body, timeout=120),
                                    range(10)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] * 5 + [429] * 5, codes
        assert all(a.json()["usage"]["completion_tokens"] == 200 for a in answers if a.status_code == 200)
    finally:
        daemon.stop()


def test_a_long_prompt_shows_in_the_gauges_while_it_is_prefilled(fake_site, tmp_path):
    daemon, _ = start(tmp_path, "server: {port: 0}\nmodels:\n" + fake_models(
        slow={"options": {"delay": 0.02}, "prefill_chunk": 8}), site=fake_site)
    try:
        prompt = " ".join(["The river ran past the village."] * 40)  # ~300 tokens: ~40 steps of 8
        body = {"model": "slow", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, daemon.url + "/v1/completions", json=body, timeout=120)
            wait_for(lambda: metric(daemon, "llmk_requests_prefilling", model="slow") == 1, timeout=30)
            assert metric(daemon, "llmk_requests_running", model="slow") == 1
            assert metric(daemon, "llmk_prefill_tokens_pending", model="slow") > 0
            assert answer.result().status_code == 200
        wait_for(lambda: metric(daemon, "llmk_prefill_tokens_pending", model="slow") == 0)
        assert metric(daemon, "llmk_kv_cache_tokens", model="slow", kind="capacity") > 0
        assert metric(daemon, "llmk_prefix_cache_tokens_total", model="slow", kind="looked_up") > 300
    finally:
        daemon.stop()


def test_a_request_that_runs_too_long_stops_with_504(fake_site, tmp_path):
    daemon, _ = start(tmp_path, "server: {port: 0, request_timeout: 0.5}\nmodels:\n" + fake_models(
        slow={"options": {"delay": 0.02}}), site=fake_site)
    try:
        body = {"model": "slow", "prompt": "Hi", "max_tokens": 1000, "temperature": 0}
        response = httpx.post(daemon.url + "/v1/completions", json=body, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        streamed = httpx.post(daemon.url + "/v1/completions", json={**body, "stream": True}, timeout=30).text
        assert '"code": "timeout"' in streamed and streamed.rstrip().endswith("data: [DONE]")
        wait_for(lambda: metric(daemon, "llmk_requests_total", model="slow", result="timeout") == 2, timeout=10)
        assert metric(daemon, "llmk_tokens_total", model="slow", kind="completion") < 200  # not 2 x 1000
    finally:
        daemon.stop()


def stream_in_thread(daemon: ServeProcess, max_tokens: int) -> tuple[threading.Thread, dict, threading.Event]:
    box: dict = {"pieces": []}
    started = threading.Event()

    def run() -> None:
        try:
            for chunk in daemon.client().completions.create(model="slow", prompt="Hi", max_tokens=max_tokens,
                                                            temperature=0, stream=True):
                box["pieces"].append(chunk.choices[0])
                started.set()
        except Exception as error:  # noqa: BLE001 - handed to the test
            box["error"] = error
        started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box, started


def test_sigterm_lets_running_requests_finish_then_exits(fake_site, tmp_path):
    daemon, _ = start(tmp_path, "server: {port: 0, shutdown_timeout: 60}\nmodels:\n" + fake_models(
        slow={"options": {"delay": 0.02}}), site=fake_site)
    thread, box, started = stream_in_thread(daemon, max_tokens=100)  # about 2 s
    assert started.wait(30)
    daemon.signal(signal.SIGTERM)
    thread.join(60)
    assert "error" not in box, box.get("error")
    assert box["pieces"][-1].finish_reason == "length" and len(box["pieces"]) == 100
    assert daemon.process.wait(60) == 0
    assert "draining" in daemon.output and "llmk serve: stopped" in daemon.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(daemon.url + "/health")


def test_sigterm_gives_up_on_requests_after_the_shutdown_timeout(fake_site, tmp_path):
    daemon, _ = start(tmp_path, "server: {port: 0, shutdown_timeout: 1}\nmodels:\n" + fake_models(
        slow={"options": {"delay": 0.02}}), site=fake_site)
    thread, box, started = stream_in_thread(daemon, max_tokens=2000)  # about 40 s
    assert started.wait(30)
    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0
    assert time.monotonic() - signalled < 20
    thread.join(30)
    assert len(box["pieces"]) < 2000


def test_a_model_still_loading_answers_503_with_retry_after(fake_site, tmp_path):
    # Each runner call sleeps 1 s, so the warm-up (prefill, decode, scoring) keeps it loading for ~3 s.
    config = "server: {port: 0}\nkernel: {wait_timeout: 0.2}\nmodels:\n" + fake_models(late={"options": {"delay": 1.0}})
    daemon, _ = start(tmp_path, config, site=fake_site, wait_ready=False)
    try:
        body = {"model": "late", "prompt": "Hi", "max_tokens": 1}
        response = httpx.post(daemon.url + "/v1/completions", json=body, timeout=30)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5" and response.json()["error"]["code"] == "model_loading"
        assert httpx.get(daemon.url + "/ready").json() == {"status": "loading", "missing": ["late"], "failed": {}}
        daemon.wait_ready(60)
        assert httpx.post(daemon.url + "/v1/completions", json=body, timeout=30).status_code == 200
    finally:
        daemon.stop()
