"""Every bad input is a 4xx, never a 5xx: a real ``llmk serve`` with tiny models, sent
oversized bodies (declared and chunked), wrong methods, bytes that are not UTF-8 or
not JSON, JSON nested 10,000 deep, out-of-range numbers and lone UTF-16 surrogates;
it answers each with a clear OpenAI-style error and keeps serving."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import ServeProcess

TOKEN = "robust-token"
LIMIT = 65_536  # server.max_body_bytes here: small, so that going over it is quick


def write_config(path, tiny_llama, tiny_bert, directory, limit: int = LIMIT) -> None:
    path.write_text(f"""
server: {{port: 0, watch_config: false, max_completion_tokens: 64, max_prompt_tokens: 200, max_body_bytes: {limit}}}
kernel: {{cache_dir: {directory / "cache"}}}
plugins: {{autoload: false}}
models:
  chat: {{source: {tiny_llama}, backend: torch, max_batch_size: 4}}
  embed: {{source: {tiny_bert}, backend: torch}}
""")


@pytest.fixture(scope="module")
def config(tiny_llama, tiny_bert, tmp_path_factory):
    directory = tmp_path_factory.mktemp("robust")
    path = directory / "llmk.yaml"
    write_config(path, tiny_llama, tiny_bert, directory)
    return path, lambda limit: write_config(path, tiny_llama, tiny_bert, directory, limit)


@pytest.fixture(scope="module")
def daemon(config):
    daemon = ServeProcess(["serve", "--config", str(config[0])], env={"LLMK_ADMIN_TOKEN": TOKEN})
    yield daemon
    daemon.stop()


def post(daemon: ServeProcess, path: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(daemon.url + path, content=content, timeout=60,
                      headers={"content-type": "application/json", **headers})


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    return error


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# -- body size -------------------------------------------------------------------------------


def test_a_body_over_the_limit_by_content_length_is_a_413(daemon):
    body = json.dumps({**CHAT, "user": "x" * LIMIT}).encode()
    error = error_of(post(daemon, "/v1/chat/completions", body), 413)
    assert error["code"] == "request_too_large" and f"{LIMIT:,} bytes" in error["message"]


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(daemon):
    url = urlsplit(daemon.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: llmk\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")  # and not one byte of it
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_chunked_body_over_the_limit_is_a_413(daemon):
    sent = []

    def chunks():
        yield b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "user": "'
        for _ in range(64):  # 512 KiB in all, 8x the limit
            sent.append(8192)
            yield b"x" * 8192
        yield b'"}'

    response = httpx.post(daemon.url + "/v1/chat/completions", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers  # it went chunked
    error = error_of(response, 413)
    assert error["code"] == "request_too_large" and f"{LIMIT:,} bytes" in error["message"]


def test_a_chunked_body_under_the_limit_is_served(daemon):
    body = json.dumps(CHAT).encode()
    response = httpx.post(daemon.url + "/v1/chat/completions", content=iter([body[:10], body[10:]]), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"]


def test_the_limit_is_read_at_each_request_so_a_reload_changes_it(daemon, config):
    path, rewrite = config
    body = json.dumps({**CHAT, "user": "x" * (LIMIT + 1000)}).encode()
    assert post(daemon, "/v1/chat/completions", body).status_code == 413
    rewrite(4 * LIMIT)
    try:
        reload = httpx.post(daemon.url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        assert reload.status_code == 200, reload.text
        assert post(daemon, "/v1/chat/completions", body).status_code == 200
    finally:
        rewrite(LIMIT)
        httpx.post(daemon.url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert post(daemon, "/v1/chat/completions", body).status_code == 413


# -- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/chat/completions", "POST"),
    ("PUT", "/v1/embeddings", "POST"),
    ("POST", "/v1/models", "GET"),
    ("PATCH", "/admin/models", "GET, POST"),
    ("POST", "/v1/responses/resp_123", "GET, DELETE"),
    ("POST", "/health", "GET"),
])
def test_a_wrong_method_is_a_405_with_allow(daemon, method, path, allow):
    response = httpx.request(method, daemon.url + path)
    error = error_of(response, 405)
    assert sorted(response.headers["allow"].split(", ")) == sorted(allow.split(", ")), error


# -- bodies that are not what they should be -------------------------------------------------

DEEP_ARRAY = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
DEEP_IN_A_FIELD = (b'{"model":"chat","messages":[{"role":"user","content":"hi"}],'
                   b'"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":'
                   + DEEP_OBJECT + b"}}}")


@pytest.mark.parametrize("path, body, message", [
    ("/v1/chat/completions", b'{"model":"chat","messages":[{"role":"user","content":"caf\xe9"}]}',
     "the body is not valid UTF-8"),
    ("/v1/embeddings", b'{"model":"embed","input":"\xff\xfe"}', "the body is not valid UTF-8"),
    ("/v1/chat/completions", b'{"model":"chat","messages":[', "the body is not valid JSON"),
    ("/v1/completions", b"{'model': 'chat'}", "the body is not valid JSON"),
    ("/v1/chat/completions", DEEP_ARRAY, "the JSON nests deeper than 64 levels"),
    ("/v1/chat/completions", DEEP_OBJECT, "the JSON nests deeper than 64 levels"),
    ("/v1/chat/completions", DEEP_IN_A_FIELD, "the JSON nests deeper than 64 levels"),
    ("/admin/models", DEEP_ARRAY, "the JSON nests deeper than 64 levels"),
    ("/v1/chat/completions", json.dumps([CHAT]).encode(), "the body must be a JSON object, not an array"),
    ("/v1/embeddings", b'"hello"', "the body must be a JSON object, not a string"),
    ("/v1/completions", b"null", "the body must be a JSON object"),
    ("/v1/completions", b"", "the request needs a body"),
])
def test_a_body_that_is_not_a_json_object_is_a_400_that_says_why(daemon, path, body, message):
    headers = {"Authorization": f"Bearer {TOKEN}"} if path.startswith("/admin") else {}
    error = error_of(post(daemon, path, body, **headers), 400)
    assert message in error["message"]


def nested(levels: int) -> dict:
    """A body whose JSON nests ``levels`` deep (its own object included), brackets in strings aside."""
    value: object = "[[[[{{{{"
    for level in range(levels - 1):
        value = {"a": value} if level % 2 else [value]
    return {**CHAT, "extra": value}


def test_brackets_inside_strings_and_nesting_up_to_the_limit_are_fine(daemon):
    body = {**CHAT, "user": "[" * 5000 + "{" * 5000 + '\\"[' * 100}
    assert post(daemon, "/v1/chat/completions", json.dumps(body).encode()).status_code == 200
    assert post(daemon, "/v1/chat/completions", json.dumps(nested(64)).encode()).status_code == 200
    error = error_of(post(daemon, "/v1/chat/completions", json.dumps(nested(65)).encode()), 400)
    assert error["message"] == "the JSON nests deeper than 64 levels"


def test_a_body_sent_as_another_content_type_is_a_400(daemon):
    response = httpx.post(daemon.url + "/v1/chat/completions", content=json.dumps(CHAT).encode(),
                          headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in error_of(response, 400)["message"]


def test_a_denormal_temperature_samples_greedily(daemon):
    # Dividing the logits by 5e-324 would overflow them: below 1e-5 the sampler picks the likeliest token.
    tiny = post(daemon, "/v1/chat/completions", json.dumps({**CHAT, "temperature": 5e-324, "max_tokens": 4}).encode())
    greedy = post(daemon, "/v1/chat/completions", json.dumps({**CHAT, "temperature": 0, "max_tokens": 4}).encode())
    assert tiny.status_code == greedy.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "seed": -1}, "seed"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "seed": -1}, "seed"),
    ("/v1/chat/completions", {**CHAT, "n": 10**30}, "n"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1e300}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": float("nan")}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": float("inf")}, "top_p"),
    *[pytest.param("/v1/completions", {"model": "chat", "prompt": prompt, "max_tokens": 2, **extra}, "prompt",
                   id=f"token-ids-{i}")
      for i, (prompt, extra) in enumerate([([10**12], {}), ([-5], {}), ([[1, 2], [10**6]], {}),
                                           ([5, 99_999], {"echo": True}), ([10**12], {"stream": True})])],
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"1": float("inf")}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]}, None),
    ("/v1/embeddings", {"model": "embed", "input": []}, "input"),
    ("/v1/embeddings", {"model": "embed", "input": [1, 2]}, "input"),
    pytest.param("/v1/completions", {"model": "chat", "prompt": "hi", "repetition_penalty": 5e-324},
                 "repetition_penalty", id="denormal-penalty"),
])
def test_numbers_and_values_out_of_range_are_a_400(daemon, path, body, param):
    # json.dumps writes NaN and Infinity as Python's json module reads them
    response = post(daemon, path, json.dumps(body).encode())
    assert 400 <= response.status_code < 500, response.text
    error = error_of(response, response.status_code)
    if param is not None:
        assert param in error["message"], error


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/admin/models", {"name": "x", "source": "/nowhere/../etc"}),
    ("POST", "/admin/models", {"name": "x", "source": "builtin:nothing"}),
    ("POST", "/admin/models", {"name": "x/y", "source": "builtin:nothing"}),
    ("POST", "/admin/models", {"name": "x", "source": "builtin:nothing", "max_batch_size": 10**30}),
    ("PUT", "/admin/models/chat", {"source": "builtin:nothing", "backend": "nope"}),
    ("PUT", "/admin/models/nobody", {"source": "builtin:nothing"}),
    ("DELETE", "/admin/models/nobody", None),
    pytest.param("POST", "/admin/models", {"name": "x", "source": "a\u0000b"}, id="nul-load"),
    pytest.param("PUT", "/admin/models/chat", {"source": "\u0000"}, id="nul-swap"),
    pytest.param("POST", "/admin/models", {"name": "x", "source": "builtin:nothing", "passes": True},
                 id="passes-true"),
    pytest.param("PUT", "/admin/models/chat", {"source": "builtin:nothing", "passes": 3}, id="passes-3"),
])
def test_bad_management_requests_are_a_4xx_and_nothing_changes(daemon, method, path, body):
    response = httpx.request(method, daemon.url + path, json=body, timeout=60,
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert 400 <= response.status_code < 500, response.text
    error_of(response, response.status_code)
    assert sorted(m.id for m in daemon.client().models.list()) == ["chat", "embed"]


# -- lone surrogates -------------------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", rb'{"model":"chat","messages":[{"role":"user","content":"\ud800"}]}'),
    ("/v1/chat/completions", rb'{"model":"chat","messages":[{"role":"user","content":"hi"}],"stream":true,'
                             rb'"stop":["\udfff"]}'),
    ("/v1/completions", rb'{"model":"chat","prompt":"\ud800"}'),
    ("/v1/completions", rb'{"model":"chat","prompt":"\ud800","stream":true}'),
    ("/v1/completions", rb'{"model":"chat","prompt":"hi","echo":true,"max_tokens":2,"user":"\ud800"}'),
    ("/v1/embeddings", rb'{"model":"embed","input":"\ud800"}'),
    ("/v1/embeddings", rb'{"model":"embed","input":["ok","\udc00"]}'),
    ("/v1/responses", rb'{"model":"chat","input":"\ud800"}'),
    ("/v1/chat/completions", rb'{"model":"\ud800","messages":[{"role":"user","content":"hi"}]}'),
])
def test_a_lone_surrogate_is_never_a_5xx(daemon, path, body):
    response = post(daemon, path, body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error_of(response, response.status_code)


# -- and after all that ----------------------------------------------------------------------


def test_the_daemon_still_serves_and_never_crashed(daemon):
    assert daemon.client().chat.completions.create(**CHAT).choices
    assert daemon.client().embeddings.create(model="embed", input="still here").data
    assert httpx.get(daemon.url + "/ready").status_code == 200
    assert not tracebacks(daemon.output)


def tracebacks(output: str) -> list[str]:
    """Each traceback in the daemon's output, up to its exception's line."""
    found = []
    for block in output.split("Traceback (most recent call last):")[1:]:
        lines = block.splitlines()[1:]
        end = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), len(lines))
        found.append("\n".join(lines[:end + 1]))
    return found
