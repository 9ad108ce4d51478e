"""The sampling surface beyond temperature, on the fake backend (whose logits are
known) and in isolation: constrained decoding (JSON schema, regex, Lark and
GBNF grammars through llguidance), log-probabilities, penalties, logit bias,
``n`` choices with their own seed streams, and token-id prompts."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from llmk.errors import OptionsError
from llmk.sampling import LogitBias, Penalties, SamplingParams, log_softmax, row_seed
from llmk.testing import load_fake

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "done": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["colour", "count", "done"],
    "additionalProperties": False,
}


@pytest.fixture
def model(kernel):
    return load_fake(kernel, "m")


def test_a_json_schema_constrains_the_output(model):
    result = model.generate("Describe it:", max_tokens=120, temperature=0, json_schema=SCHEMA)
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), SCHEMA)
    # unconstrained, the same model writes no JSON at all
    assert not model.generate("Describe it:", max_tokens=40, temperature=0).text.lstrip().startswith("{")


def test_sampled_outputs_validate_too(model):
    results = model.generate("Describe it:", n=4, max_tokens=120, temperature=1.0, seed=7, json_schema=SCHEMA)
    for result in results:
        assert result.finish_reason == "stop"
        jsonschema.validate(json.loads(result.text), SCHEMA)


def test_a_regex_and_grammars_constrain_the_output(model):
    result = model.generate("Date:", max_tokens=30, temperature=0, regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]")
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", result.text) and result.finish_reason == "stop"
    lark = 'start: "yes" | "no" | "maybe"'
    assert model.generate("Well?", max_tokens=10, temperature=0, grammar=lark).text in ("yes", "no", "maybe")
    gbnf = 'root ::= ("cat" | "dog") " " [0-9]'
    assert re.fullmatch(r"(cat|dog) [0-9]", model.generate("Pet:", max_tokens=10, temperature=0, grammar=gbnf).text)


def test_the_mask_holds_against_a_bias(model):
    # A +100 bias on a token the grammar forbids cannot bring it back: the mask runs last.
    token = model.version.engine.tokenizer.encode("x", special=False)[0]
    result = model.generate("Well?", max_tokens=10, temperature=0, grammar='start: "yes" | "no"',
                            logit_bias={token: 100})
    assert result.text in ("yes", "no")


@pytest.mark.parametrize(("params", "field"), [
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "json_schema"),
    ({"regex": "(unclosed"}, "regex"),
    ({"grammar": "start: undefined_rule"}, "grammar"),
    ({"json_schema": {"type": "object"}, "regex": "a+"}, "exclusive"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
])
def test_bad_constraints_are_refused_by_name(model, params, field):
    with pytest.raises(OptionsError, match=field):
        model.generate("Hi", max_tokens=4, **params)


def test_a_constrained_row_does_not_change_the_others(model):
    prompts = ["The cat sat on the mat and", "Once upon a time"]
    alone = [model.generate(p, max_tokens=12, temperature=0).token_ids for p in prompts]
    engine = model.version.engine
    constrained = engine.submit(engine.prompt_ids("Describe it:"),
                                SamplingParams.build(max_tokens=120, temperature=0, json_schema=SCHEMA))
    together = model.generate(prompts, max_tokens=12, temperature=0)
    assert [r.token_ids for r in together] == alone
    jsonschema.validate(json.loads("".join(c.text for c in constrained)), SCHEMA)


# -- log-probabilities ---------------------------------------------------------------


def test_logprobs_are_the_models_own(model):
    result = model.generate("The cat", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    runner = model.version.engine.runner
    context = model.version.engine.prompt_ids("The cat")
    assert [p.token_id for p in result.logprobs] == result.token_ids
    for step, entry in enumerate(result.logprobs):
        expected = log_softmax(runner.row(context, step + 1))
        assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-5)
        assert [a.token_id for a in entry.top][0] == entry.token_id  # greedy: the likeliest
        assert [a.logprob for a in entry.top] == sorted((a.logprob for a in entry.top), reverse=True)
        assert len(entry.top) == 3
        context.append(entry.token_id)
    assert model.generate("The cat", max_tokens=6, temperature=0).logprobs is None


def test_streamed_chunks_carry_their_tokens_logprobs(model):
    chunks = list(model.stream("The cat", max_tokens=6, temperature=0, logprobs=True))
    assert [p.token_id for c in chunks for p in c.logprobs] == [t for c in chunks for t in c.token_ids]


def test_prompt_logprobs_score_each_token_given_the_ones_before(model):
    engine = model.version.engine
    ids = engine.prompt_ids("The cat sat")
    entries = engine.prompt_logprobs(ids, top=2)
    assert entries[0].logprob is None and [e.token_id for e in entries] == ids
    for i in range(1, len(ids)):
        assert entries[i].logprob == pytest.approx(float(log_softmax(engine.runner.row(ids[:i]))[ids[i]]), abs=1e-5)


# -- penalties and biases --------------------------------------------------------------


def test_penalties_follow_openai_and_transformers():
    logits = np.array([1.0, -1.0, 0.5, 2.0], dtype=np.float32)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    out = Penalties(params, prompt_ids=[1])([0, 0, 3], logits)
    # token 0: seen twice (1/2, then -0.5 - 2*0.25); 1: in the prompt (-1*2); 2: unseen; 3: once
    assert out.tolist() == pytest.approx([0.5 - 1.0, -2.0, 0.5, 1.0 - 0.75])
    assert logits.tolist() == [1.0, -1.0, 0.5, 2.0]  # the input row is not changed


def test_a_logit_bias_steers_greedy_decoding(model):
    token = model.version.engine.tokenizer.encode(" cat", special=False)[0]
    result = model.generate("Hello", max_tokens=5, temperature=0, logit_bias={token: 100})
    assert result.token_ids == [token] * 5
    biased = LogitBias({2: -100.0}, vocab_size=4)([], np.zeros(4, dtype=np.float32))
    assert biased.tolist() == [0, 0, -100, 0]


def test_a_repetition_penalty_reaches_the_engine(model):
    # The fake model's pick has logit 10 and the rest at most 2.5: divided by 10, a seen token loses.
    prompt = model.version.engine.prompt_ids("a b c d e f g h")
    plain = model.generate(prompt, max_tokens=40, temperature=0).token_ids
    assert len(set(plain)) < len(plain)  # the plain output repeats itself
    penalised = model.generate(prompt, max_tokens=40, temperature=0, repetition_penalty=10.0).token_ids
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(prompt)


# -- n choices, token-id prompts -----------------------------------------------------------


def test_n_choices_have_their_own_seed_streams(model):
    first = model.generate("Once", n=3, max_tokens=8, temperature=1.0, seed=11)
    again = model.generate("Once", n=3, max_tokens=8, temperature=1.0, seed=11)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in first}) > 1
    # choice 0 is what n=1 gives with the seed; choice 1 what its own derived seed gives
    assert model.generate("Once", max_tokens=8, temperature=1.0, seed=11).token_ids == first[0].token_ids
    assert model.generate("Once", max_tokens=8, temperature=1.0, seed=row_seed(11, 1)).token_ids == first[1].token_ids


def test_chat_with_n_gives_a_list(model):
    results = model.chat([{"role": "user", "content": "Hi"}], n=2, max_tokens=4, temperature=0)
    assert len(results) == 2 and results[0].token_ids == results[1].token_ids


def test_prompts_can_be_token_ids(model):
    ids = model.version.engine.prompt_ids("Once upon a time")
    assert model.generate(ids, max_tokens=6, temperature=0).token_ids == \
        model.generate("Once upon a time", max_tokens=6, temperature=0).token_ids
    both = model.generate([ids, ids], max_tokens=3, temperature=0)
    assert len(both) == 2 and both[0].token_ids == both[1].token_ids


@pytest.mark.parametrize("n", [0, 129, 1.5])
def test_a_bad_n_is_refused(model, n):
    with pytest.raises(OptionsError, match="n must be"):
        model.generate("Hi", n=n)


def test_content_parts_and_tool_turns_are_accepted(model):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is the weather "},
                                     {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert model.chat(messages, max_tokens=3, temperature=0).completion_tokens == 3
    with pytest.raises(OptionsError, match="text only"):
        model.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], max_tokens=2)


WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_a_required_tool_call_is_valid_and_parsed(model):
    result = model.chat([{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], tool_choice="required",
                        parallel_tool_calls=False, max_tokens=80, temperature=0)
    assert result.finish_reason == "tool_calls" and result.tool_calls and result.text == ""
    for call in result.tool_calls:
        assert call.name == "weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


def test_a_streamed_tool_call_arrives_whole_and_never_as_text(model):
    chunks = list(model.chat_stream([{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "weather"}},
                                    parallel_tool_calls=False, max_tokens=80, temperature=0))
    assert "".join(c.text for c in chunks).strip() == ""
    calls = [call for c in chunks for call in c.tool_calls]
    assert calls and chunks[-1].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])


def test_tool_choice_without_tools_is_refused(model):
    with pytest.raises(OptionsError, match="tool_choice"):
        model.chat([{"role": "user", "content": "Hi"}], tool_choice="required", max_tokens=2)
