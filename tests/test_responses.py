"""The Responses API (``/v1/responses``) as users call it: a real ``llmk serve``
process and the real ``openai`` client. The tiny Llama, its context widened to
1,024 positions (RoPE has no learned positions) so that a tool prompt fits.
What a model cannot be made to do on cue (fail mid-stream, write text around a
call) runs the event stream on stand-in chunks."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest
from conftest import ServeProcess
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from llmk.sequence import StreamChunk
from llmk.server.errors import ApiError
from llmk.server.responses import ResponseBody, ResponseStore, StreamEvents, _sse, draft
from llmk.tools import ToolCall

WEATHER = {
    "type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def wide_llama(tiny_llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("wide") / "llama"
    shutil.copytree(tiny_llama, directory)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        config = json.loads((directory / name).read_text())
        config[key] = 1024
        (directory / name).write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def daemon(wide_llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    config = directory / "llmk.yaml"
    config.write_text(f"""
server: {{port: 0, max_completion_tokens: 256, max_prompt_tokens: 900}}
kernel: {{cache_dir: {directory / "cache"}}}
plugins: {{autoload: false}}
models:
  chat: {{source: {wide_llama}, backend: torch, max_batch_size: 4}}
""")
    daemon = ServeProcess(["serve", "--config", str(config)])
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def client(daemon):
    return daemon.client()


def post(daemon, body):
    return httpx.post(daemon.url + "/v1/responses", json={"model": "chat", **body}, timeout=60)


def test_a_text_response(daemon, client):
    response = client.responses.create(model="chat", input="Hello", max_output_tokens=8, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete") and response.output_text
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert (message.type, message.role, message.id[:4]) == ("message", "assistant", "msg_")
    usage = response.usage
    assert 0 < usage.output_tokens <= 8 and usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert (response.temperature, response.max_output_tokens, response.store) == (0, 8, True)
    # the raw body validates as the SDK's type, every required field there
    raw = post(daemon, {"input": "Hello", "max_output_tokens": 8, "temperature": 0, "metadata": {"k": "v"}})
    assert raw.status_code == 200, raw.text
    strict = Response.model_validate(raw.json())
    assert strict.output_text == response.output_text and strict.metadata == {"k": "v"}


def test_items_instructions_and_text_parts(client):
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": "!"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"role": "developer", "content": "Short answers."},
        {"role": "user", "content": "More"},
    ]
    bare = client.responses.create(model="chat", input=items, max_output_tokens=4, temperature=0)
    told = client.responses.create(model="chat", input=items, instructions="Be brief.", max_output_tokens=4,
                                   temperature=0)
    assert told.instructions == "Be brief." and told.output_text
    assert told.usage.input_tokens > bare.usage.input_tokens  # the instructions are in the prompt


@pytest.mark.parametrize("body, words", [
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "What is it?"},
                                              {"type": "input_image", "image_url": "https://x/y.png"}]}]},
     ["input[0].content[1]", "'input_image'", "text only"]),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, ["tools[0]", "'web_search'"]),
    ({"input": "Hi", "tools": [WEATHER, {"type": "code_interpreter", "container": {"type": "auto"}}]},
     ["tools[1]", "'code_interpreter'"]),
    ({"input": "Hi", "reasoning": {"effort": "high"}}, ["reasoning", "do not reason"]),
    ({"input": "Hi", "truncation": "auto"}, ["truncation", "'auto'"]),
    ({"input": "Hi", "background": True}, ["background"]),
    ({"input": "Hi", "include": ["message.output_text.logprobs"]}, ["include"]),
    ({"input": "Hi", "top_logprobs": 2}, ["top_logprobs"]),
    ({"input": "Hi", "conversation": "conv_1"}, ["conversation", "previous_response_id"]),
    ({"input": "Hi", "max_output_tokens": 100_000}, ["max_output_tokens", "256"]),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, ["input[0]", "item references"]),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, ["schema"]),
    ({}, ["input"]),
])
def test_what_is_not_supported_is_a_400_that_names_it(daemon, body, words):
    response = post(daemon, body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message


def test_the_sdk_gets_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="input_image"):
        client.responses.create(model="chat", max_output_tokens=4, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])


def test_a_json_schema_format(client):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["colour", "count"], "additionalProperties": False}
    response = client.responses.create(
        model="chat", input="Describe it as JSON", max_output_tokens=120, temperature=0,
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema" and response.text.format.name == "thing"


def test_a_required_function_call_then_its_output(client):
    first = client.responses.create(model="chat", input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", parallel_tool_calls=False, max_output_tokens=120,
                                    temperature=0)
    assert first.status == "completed"
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert first.tools[0].name == "get_weather" and first.tool_choice == "required"

    answer = client.responses.create(model="chat", previous_response_id=first.id, max_output_tokens=6,
                                     temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                            "output": "Sunny, 21 C"}])
    assert answer.previous_response_id == first.id
    assert [item.type for item in answer.output] == ["message"] and answer.output_text
    alone = client.responses.create(model="chat", max_output_tokens=1, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}])
    assert answer.usage.input_tokens > alone.usage.input_tokens  # the earlier turns are in the prompt

    # the same history sent as items instead of previous_response_id
    again = client.responses.create(model="chat", max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}])
    assert again.output_text == answer.output_text and again.usage.input_tokens == answer.usage.input_tokens


def test_a_named_function_and_max_tool_calls_zero(daemon, client):
    named = client.responses.create(model="chat", input="Weather?", tools=[WEATHER], max_output_tokens=120,
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    assert [item.type for item in named.output] == ["function_call"]
    refused = post(daemon, {"input": "Hi", "tools": [WEATHER], "tool_choice": "required", "max_tool_calls": 0})
    assert refused.status_code == 400 and "max_tool_calls" in refused.json()["error"]["message"]


def stream_events(client, **kwargs):
    events = list(client.responses.create(model="chat", stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_streaming_events_in_order_and_the_stored_response(client):
    events = stream_events(client, input="The cat", max_output_tokens=10, temperature=0)
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                "response.content_part.added", *[d.type for d in deltas],
                                "response.output_text.done", "response.content_part.done",
                                "response.output_item.done", "response.incomplete"]
    final = events[-1].response
    text = "".join(d.delta for d in deltas)
    assert text == events[-4].text == final.output_text
    assert {d.item_id for d in deltas} == {final.output[0].id} and final.output[0].status == "incomplete"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final == client.responses.retrieve(final.id)
    whole = client.responses.create(model="chat", input="The cat", max_output_tokens=10, temperature=0)
    assert whole.output_text == text and whole.usage.output_tokens == final.usage.output_tokens


def test_streaming_a_function_call(client):
    events = stream_events(client, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                           parallel_tool_calls=False, max_output_tokens=120, temperature=0)
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    added, delta, done, item_done, completed = events[2:]
    assert added.item.type == "function_call" and added.item.status == "in_progress"
    assert delta.delta == done.arguments == item_done.item.arguments == completed.response.output[0].arguments
    jsonschema.validate(json.loads(done.arguments), WEATHER["parameters"])
    assert completed.response == client.responses.retrieve(completed.response.id)


def test_store_false_previous_ids_and_delete(daemon, client):
    unstored = client.responses.create(model="chat", input="Hi", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError, match="last 1,000"):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError, match="kept in this server's memory"):
        client.responses.create(model="chat", input="Hi", max_output_tokens=2, previous_response_id=unstored.id)
    kept = client.responses.create(model="chat", input="Hi", max_output_tokens=2)
    deleted = httpx.delete(f"{daemon.url}/v1/responses/{kept.id}")
    assert deleted.json() == {"id": kept.id, "object": "response", "deleted": True}
    assert httpx.get(f"{daemon.url}/v1/responses/{kept.id}").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)
    paths = httpx.get(daemon.url + "/openapi.json").json()["paths"]
    assert {"/v1/responses", "/v1/responses/{response_id}"} <= set(paths)


def test_the_store_keeps_the_last_ones():
    import asyncio

    store = ResponseStore(limit=3)
    for i in range(5):
        asyncio.run(store.put({"id": f"resp_{i}", "output": [{"type": "message", "content": [{"text": f"t{i}"}]}]},
                              [{"role": "user", "content": "q"}]))
    assert len(store) == 3 and asyncio.run(store.get("resp_1")) is None
    assert asyncio.run(store.get("resp_4")).conversation == [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "t4"}]


def raw_events(lines):
    """The (event name, data) pairs of server-sent events, each data validated as the SDK's event type."""
    adapter = TypeAdapter(ResponseStreamEvent)
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
            assert data["type"] == name
            adapter.validate_python(data)
            if "response" in data:
                Response.model_validate(data["response"])
            events.append(data)
    return events


def test_raw_events_validate_as_the_sdk_types(daemon):
    # Greedy, one call: a sampled answer may run past the token limit and end "incomplete".
    body = {"model": "chat", "input": "Weather?", "tools": [WEATHER], "tool_choice": "required",
            "parallel_tool_calls": False, "max_output_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", daemon.url + "/v1/responses", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = raw_events(response.iter_lines())
    assert events[-1]["type"] == "response.completed"
    # Cut short (8 tokens is less than any answer it gives): the stream ends "incomplete".
    cut = {**body, "tools": None, "tool_choice": None, "max_output_tokens": 8}
    with httpx.stream("POST", daemon.url + "/v1/responses", json=cut, timeout=60) as response:
        assert raw_events(response.iter_lines())[-1]["type"] == "response.incomplete"


class Chunks:
    """A stand-in for a model's stream: these chunks, then maybe an error."""

    prompt_tokens = 5

    def __init__(self, chunks, error=None):
        self.chunks, self.error, self.closed = chunks, error, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    async def aclose(self):
        self.closed = True


class Scoped:
    """A stand-in for the HTTP request (``note`` writes into its scope)."""

    def __init__(self):
        self.scope = {}


def run_sse(chunks, error=None, max_calls=None, hold_space=False):
    import asyncio

    stream, kept = Chunks(chunks, error), []
    events = StreamEvents(draft(ResponseBody(model="m", input="x")), max_calls, hold_space=hold_space)

    async def keep(response):
        kept.append(response)

    async def collect():
        return [line async for line in _sse(Scoped(), stream, events, keep, 30.0)]

    lines = "".join(asyncio.run(collect())).splitlines()
    assert stream.closed
    return raw_events(lines), kept


def test_an_error_after_the_headers_is_a_failed_response():
    events, kept = run_sse([StreamChunk("Hi", [1])], ApiError(429, "the queue is full", "rate_limit_error"))
    failed = events[-1]["response"]
    assert [e["type"] for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    assert failed["status"] == "failed" and failed["error"] == {"code": "rate_limit_exceeded",
                                                                "message": "the queue is full"}
    assert failed["output"][0]["status"] == "incomplete" and kept == [failed]
    events, _ = run_sse([StreamChunk("Hi", [1]), StreamChunk("", [], "timeout")])
    assert events[-1]["type"] == "response.failed" and "took longer" in events[-1]["response"]["error"]["message"]


def test_streamed_calls_close_the_text_and_its_spaces_are_dropped():
    call = ToolCall("get_weather", '{"city": "Oslo"}')
    events, _ = run_sse([StreamChunk("  Sure", [1]), StreamChunk(" \n", [2], tool_calls=[call]),
                         StreamChunk("\n", [3], tool_calls=[ToolCall("get_weather", "{}")]),
                         StreamChunk(" ", [4], "tool_calls")], max_calls=1, hold_space=True)
    final = events[-1]["response"]
    assert [(i["type"], i["status"]) for i in final["output"]] == [("message", "completed"),
                                                                   ("function_call", "completed")]
    assert final["output"][0]["content"][0]["text"] == "Sure" and final["output"][1]["call_id"] == call.id
    assert final["usage"]["output_tokens"] == 4 and events[-1]["type"] == "response.completed"
    events, _ = run_sse([StreamChunk("", [], "stop")])
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""  # always an answer


def test_a_client_that_leaves_cancels_the_generation_and_metrics_count(daemon):
    start = len(daemon.lines)
    body = {"model": "chat", "input": "A long story", "max_output_tokens": 250, "stream": True}
    with httpx.stream("POST", daemon.url + "/v1/responses", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if "response.output_text.delta" in line:
                break
    daemon.wait_for_line(r"http\.request.*/v1/responses.*cancelled", timeout=30, start=start)
    text = httpx.get(daemon.url + "/metrics").text
    assert 'llmk_http_requests_total{endpoint="/v1/responses",model="chat",status="200"}' in text
