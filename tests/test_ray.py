"""llmk on Ray Serve (``llmk serve --ray ADDRESS``), on a local Ray cluster this module
starts on 127.0.0.1 (``ray start --head``), with two replicas of real tiny models:
the openai client unchanged, multiplexing more models than a replica holds,
failover when a replica is killed with SIGKILL (non-streaming requests retried,
a stream under way ended with an error event), a rolling swap and a reload under
load with no failed request, per-replica metrics, and autoscaling up and down.

The failover and autoscaling tests also serve llmk's fake backend, whose pace
(a fixed delay per step) keeps requests in flight while a replica is killed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ServeProcess

from llmk.backend import missing_modules

pytestmark = pytest.mark.skipif(missing_modules(("ray",)) is not None,
                                reason="Ray Serve is not installed: pip install 'llmk[ray]'")

TOKEN_ENV = "LLMK_TEST_ADMIN_TOKEN"
TOKEN = "ray-s3cret"
RAY = str(Path(sys.executable).parent / "ray")
#: A throwaway cluster on loopback: no token between its processes (Ray's default on a real one).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def relayed(interval: float, script) -> list[bytes]:  # noqa: ANN001 - an async app script
    """The body chunks ``call_asgi`` yields for an ASGI app that sends what ``script``
    says: ``script(send_body, received, yielded)`` where ``received(n)`` waits until the
    relay has yielded ``n`` body chunks and ``yielded()`` counts them."""
    import asyncio

    from llmk.ray.replica import call_asgi

    async def main() -> list[bytes]:
        chunks: list[bytes] = []
        grew = asyncio.Condition()

        async def received(count: int) -> None:
            async with grew:
                await grew.wait_for(lambda: len(chunks) >= count)

        async def app(scope, receive, send):  # noqa: ANN001, ANN202 - the ASGI signature
            await send({"type": "http.response.start", "status": 200, "headers": []})

            async def body(data: bytes, more: bool = True) -> None:
                await send({"type": "http.response.body", "body": data, "more_body": more})
            await script(body, received, lambda: len(chunks))

        request = {"method": "POST", "path": "/", "query_string": "", "headers": [], "body": b""}
        async for part in call_asgi(app, request, interval=interval):
            if isinstance(part, bytes):
                async with grew:
                    chunks.append(part)
                    grew.notify_all()
        return chunks

    return asyncio.run(asyncio.wait_for(main(), 60))  # a relay that waits for its interval here is a failure


def test_a_replica_streams_the_first_token_at_once_then_gathers_chunks_per_interval():
    import asyncio

    async def stream(body, received, yielded):  # noqa: ANN001, ANN202
        await body(b"role ")
        await received(1)  # the relay sent it without its interval (an hour): no wait
        await body(b"t1 ")
        await received(2)  # the first token too
        for token in (b"t2 ", b"t3 ", b"t4 "):
            await body(token)
            for _ in range(20):  # time for the relay to run: it holds the tokens for the interval
                await asyncio.sleep(0)
            assert yielded() == 2
        await body(b"", more=False)  # the end goes at once, with what waited for the interval

    assert relayed(3600.0, stream) == [b"role ", b"t1 ", b"t2 t3 t4 "]

    async def paced(body, received, yielded):  # noqa: ANN001, ANN202
        for count, token in enumerate((b"role ", b"t1 ", b"t2 ", b"t3 "), start=1):
            await body(token)
            await received(count)  # each one sent as it came: no interval
        await body(b"", more=False)

    assert relayed(0.0, paced) == [b"role ", b"t1 ", b"t2 ", b"t3 "]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(fake_site: Path) -> Iterator[dict[str, str]]:
    """A Ray cluster on 127.0.0.1 (4 logical CPUs on this 2-core machine: replicas
    reserve one each), its workers able to import the fake backend's plugin."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_site), os.environ.get("PYTHONPATH", "")]),
           TOKEN_ENV: TOKEN, **RAY_ENV}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    try:
        yield {"address": f"127.0.0.1:{port}", "http_port": str(free_port())}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=180)


def deploy(cluster: dict[str, str], directory: Path, ray: dict, models: dict) -> tuple[ServeProcess, Path]:
    """``llmk serve --config FILE --ray ADDRESS`` with ``ray`` and ``models`` as its config."""
    config = {"server": {"port": int(cluster["http_port"]), "admin_token_env": TOKEN_ENV, "watch_config": False,
                         "request_timeout": 120, "shutdown_timeout": 10, "stall_timeout": 3},
              "kernel": {"cache_dir": str(directory / "cache")}, "ray": ray, "models": models}
    path = directory / "llmk.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return ServeProcess(["serve", "--config", str(path), "--ray", cluster["address"]],
                        env={TOKEN_ENV: TOKEN, **RAY_ENV}, ready_timeout=600), path


def fleet_models(tiny_llama: Path) -> dict:
    tiny = {"source": str(tiny_llama), "backend": "torch"}
    return {"chat": tiny, "chat2": {**tiny, "max_batch_size": 4}, "chat3": {**tiny, "max_batch_size": 2},
            "slow": {"source": "fake:slow", "backend": "fake", "options": {"delay": 0.02}},
            # Its engine blocks on the pad token (id 2: never in a warm-up or a generated text).
            "stuck": {"source": "fake:stuck", "backend": "fake", "options": {"hang_on_token": 2}}}


@pytest.fixture(scope="module")
def fleet(cluster, tiny_llama, tmp_path_factory) -> Iterator[tuple[ServeProcess, Path]]:
    """Two replicas holding at most two of the four models each."""
    directory = tmp_path_factory.mktemp("ray-fleet")
    ray = {"num_replicas": 2, "max_models_per_replica": 2, "ray_actor_options": {"num_cpus": 1}}
    process, path = deploy(cluster, directory, ray, fleet_models(tiny_llama))
    wait_members(process, 2)
    yield process, path
    process.stop()


def admin(process: ServeProcess, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, process.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600,
                         **kwargs)


def members(process: ServeProcess) -> list[str]:
    """The replicas in the fleet (each polls its control plane)."""
    response = httpx.get(process.url + "/ready", timeout=30)
    return response.json()["replica_ids"] if response.status_code == 200 else []


def wait_members(process: ServeProcess, count: int, timeout: float = 300, without: str | None = None) -> None:
    """Until the fleet has ``count`` replicas, ``without`` (a killed one) not among them."""
    deadline = time.monotonic() + timeout
    while len(found := members(process)) != count or without in found:
        assert time.monotonic() < deadline, f"the fleet did not reach {count} replicas:\n{process.output[-3000:]}"
        time.sleep(0.5)


def busy_holder(process: ServeProcess, model: str) -> tuple[str, int] | None:
    """The replica (id, pid) with the most requests of ``model`` in its engine, if any has one."""
    data = admin(process, "GET", "/admin/models").json()["data"]
    load = [(v["running"] + v["queued"], v["replica"], v["pid"]) for v in data
            if v["name"] == model and v["current"] and v["state"] == "ready"]
    count, replica, pid = max(load, default=(0, "", 0))
    return (replica, pid) if count > 0 else None


def counter(process: ServeProcess, sample: str) -> float:
    for line in httpx.get(process.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def ask(process: ServeProcess, model: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(process.url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens})


def test_the_openai_client_works_unchanged(fleet):
    import openai

    process, _ = fleet
    client = process.client()
    assert {m.id for m in client.models.list()} == {"chat", "chat2", "chat3", "slow", "stuck"}
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0)
    again = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
    assert again.choices[0].message.content == reply.choices[0].message.content  # greedy, whichever replica
    chunks = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    completion = client.completions.create(model="chat2", prompt="once upon", max_tokens=5)
    assert completion.usage.completion_tokens == 5
    # Stored responses are the fleet's: any replica finds one that another created.
    first = client.responses.create(model="chat", input="Hi", max_output_tokens=4)
    follow = client.responses.create(model="chat", input="And?", max_output_tokens=4, previous_response_id=first.id)
    assert follow.usage.input_tokens > first.usage.input_tokens  # the first exchange is in its prompt
    assert all(client.responses.retrieve(first.id).id == first.id for _ in range(4))
    # Errors are llmk serve's: the same statuses and bodies.
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert bad.value.param == "temperature"
    body = httpx.post(process.url + "/v1/chat/completions", content=b"{not json",
                      headers={"Content-Type": "application/json"})
    assert body.status_code == 400 and body.json()["error"]["code"] == "invalid_json"
    assert httpx.get(process.url + "/admin/models").status_code == 401
    assert httpx.get(process.url + "/health").json() == {"status": "ok"}
    assert httpx.get(process.url + "/v1/models/slow").json()["id"] == "slow"
    assert httpx.get(process.url + "/v1/models/nope").status_code == 404
    paths = httpx.get(process.url + "/openapi.json").json()["paths"]  # llmk serve's schema
    assert {"/v1/chat/completions", "/v1/responses", "/admin/models"} <= set(paths)


def test_more_models_than_a_replica_holds_all_serve(fleet):
    process, _ = fleet
    for _ in range(2):
        for model in ("chat", "chat2", "chat3", "slow", "chat3", "chat"):
            assert ask(process, model).status_code == 200, model
    data = admin(process, "GET", "/admin/models").json()["data"]
    held: dict[str, set[str]] = {}
    for version in data:
        if version["current"]:
            held.setdefault(version["replica"], set()).add(version["name"])
    assert len(held) == 2 and all(len(names) <= 2 for names in held.values()), held


def test_metrics_hold_every_replica_labelled(fleet):
    process, _ = fleet
    text = httpx.get(process.url + "/metrics").text
    assert "llmk_ray_replicas 2.0" in text
    replicas = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("llmk_model_") and 'replica="' in line}
    assert len(replicas) == 2, replicas
    assert text.count("# TYPE llmk_http_requests_total counter") <= 1  # families merged, not repeated


def test_a_killed_replica_loses_no_request(fleet):
    """100 requests, 8 at a time; once 10 have finished, a replica with some of them in its
    engine is killed with SIGKILL: every request still succeeds (retried on the other replica)."""
    process, _ = fleet
    assert ask(process, "slow").status_code == 200
    retried = counter(process, 'llmk_ray_failovers_total{outcome="retried"}')
    done = threading.Semaphore(0)

    def one(_: int) -> int:
        status = ask(process, "slow", max_tokens=16).status_code
        done.release()
        return status

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = pool.map(one, range(100))
        for _ in range(10):
            done.acquire()
        # Ray routes by what its controller last heard of each replica's models: kill one
        # that has requests of the model in its engine now (the first holder may have none).
        while (busy := busy_holder(process, "slow")) is None:  # look again once another one finished
            assert done.acquire(timeout=60), "no request of the model finished, nor is one in an engine"
        replica, victim = busy
        os.kill(victim, signal.SIGKILL)
        statuses = list(results)
    assert statuses == [200] * 100
    assert counter(process, 'llmk_ray_failovers_total{outcome="retried"}') > retried
    wait_members(process, 2, without=replica)  # Ray started a new replica in its place


def test_a_stream_cut_by_a_killed_replica_ends_with_an_error_event(fleet):
    process, _ = fleet
    cut = counter(process, "llmk_ray_streams_cut_total")
    body = {"model": "slow", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", process.url + "/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events: list[str] = []
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3:
                break
        serving = [(v["replica"], v["pid"]) for v in admin(process, "GET", "/admin/models").json()["data"]
                   if v["name"] == "slow" and v["current"] and v["active_requests"]]
        assert len(serving) == 1
        os.kill(serving[0][1], signal.SIGKILL)
        events += [line for line in lines if line.startswith("data: ")]
    error = json.loads(events[-2].removeprefix("data: "))
    assert error["error"]["code"] == "replica_unavailable" and events[-1] == "data: [DONE]"
    assert all("error" not in json.loads(e.removeprefix("data: ")) for e in events[:3])
    assert counter(process, "llmk_ray_streams_cut_total") == cut + 1
    wait_members(process, 2, without=serving[0][0])


def under_load(process: ServeProcess, model: str, change) -> tuple[list[int], list[str], object]:
    """Requests for ``model`` from 4 threads all through ``change()``: their statuses, the
    bodies of those that failed, and its result."""
    stop = threading.Event()
    statuses: list[int] = []
    failures: list[str] = []

    def client() -> None:
        while not stop.is_set():
            response = ask(process, model)
            statuses.append(response.status_code)
            if response.status_code != 200:
                failures.append(response.text)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        while len(statuses) < 8:  # the load is on before the change starts
            time.sleep(0.05)
        result = change()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return statuses, failures, result


def test_a_rolling_swap_under_load_fails_no_request(fleet, tiny_llama):
    process, _ = fleet
    assert ask(process, "chat").status_code == 200
    before = {v["replica"]: v["version"] for v in admin(process, "GET", "/admin/models").json()["data"]
              if v["name"] == "chat" and v["current"]}
    statuses, failures, swap = under_load(process, "chat", lambda: admin(
        process, "PUT", "/admin/models/chat", json={"source": str(tiny_llama), "backend": "torch",
                                                     "max_batch_size": 3}))
    assert swap.status_code == 200, swap.text
    assert set(swap.json()["replicas"]) >= set(before)
    assert statuses and set(statuses) == {200}, failures
    after = {v["replica"]: v["version"] for v in admin(process, "GET", "/admin/models").json()["data"]
             if v["name"] == "chat" and v["current"]}
    assert before and set(before) <= set(after)
    assert all(after[replica] > version for replica, version in before.items())


def test_a_reload_rolls_out_replica_by_replica(fleet, tiny_llama):
    process, path = fleet
    config = json.loads(path.read_text())
    config["models"]["chat2"]["max_batch_size"] = 5
    config["models"]["extra"] = {"source": str(tiny_llama), "backend": "torch", "max_batch_size": 1}
    path.write_text(json.dumps(config))
    statuses, failures, reload = under_load(process, "chat2", lambda: admin(process, "POST", "/admin/reload"))
    assert reload.status_code == 200, reload.text
    assert len(reload.json()["replicas"]) == 2
    assert set(statuses) == {200}, failures
    assert "extra" in {m.id for m in process.client().models.list()}
    assert ask(process, "extra").status_code == 200
    broken = path.read_text().replace('"models"', '"modelz"')
    path.write_text(broken)
    refused = admin(process, "POST", "/admin/reload")
    assert refused.status_code == 400 and "modelz" in refused.json()["error"]["message"]
    assert ask(process, "extra").status_code == 200  # nothing changed


def test_a_stalled_engine_fails_ray_s_health_check_and_its_replica_is_replaced(fleet):
    """The engines' watchdog is the replica's liveness: a stuck engine fails its waiting
    request (503 model_stalled, after server.stall_timeout) and Ray's health check,
    and Ray starts a new replica in place of the stuck one."""
    process, _ = fleet
    answer = httpx.post(process.url + "/v1/completions", json={"model": "stuck", "prompt": [2], "max_tokens": 2},
                        timeout=300)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_stalled", answer.text
    stuck = [v["replica"] for v in admin(process, "GET", "/admin/models").json()["data"]
             if v["name"] == "stuck" and v["current"] and v["stalled_since"] is not None]
    if stuck:  # Ray may have replaced it already
        wait_members(process, 2, without=stuck[0])
    assert not [v for v in admin(process, "GET", "/admin/models").json()["data"] if v["stalled_since"] is not None]
    assert ask(process, "chat").status_code == 200


def test_sigterm_deletes_the_application_and_exits(fleet):
    process, _ = fleet
    process.signal(signal.SIGTERM)
    assert process.process.wait(120) == 0
    assert "stopped" in process.output


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(cluster, fleet, tmp_path):
    fleet[0].stop()  # one application on the cluster's port at a time
    ray = {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                           "upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 1},
           "ray_actor_options": {"num_cpus": 1}}
    process, _ = deploy(cluster, tmp_path, ray, {"slow": {"source": "fake:slow", "backend": "fake",
                                                          "options": {"delay": 0.05}}})
    try:
        wait_members(process, 1)
        statuses, failures, _ = under_load(process, "slow", lambda: wait_members(process, 2))
        assert set(statuses) == {200}, failures
        wait_members(process, 1)  # idle again: back to min_replicas
    finally:
        process.stop()
