"""Tool calling as text: validating tools, rendering them, parsing calls and the call grammar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_cache_dir

from llmk.errors import OptionsError
from llmk.tools import (
    ToolCall,
    ToolCallStream,
    parse_tool_calls,
    render_messages,
    tool_grammar,
    tool_set,
    tools_in_template,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}


def call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# -- tool_set -----------------------------------------------------------------------------


def test_tool_set_chat_shape_defaults():
    tools = tool_set([WEATHER, {"type": "function", "function": {"name": "now", "strict": True}}])
    assert tools.choice == "auto" and tools.function is None and tools.parallel is True
    assert tools.tools[0] == WEATHER
    assert tools.tools[1] == {"type": "function", "function": {"name": "now",
                                                               "parameters": {"type": "object", "properties": {}}}}


def test_tool_set_responses_flat_shape_and_named_choice():
    flat = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
            "parameters": WEATHER["function"]["parameters"], "strict": True}
    tools = tool_set([flat, ADD], {"type": "function", "name": "add"}, False)
    assert tools.tools[0] == WEATHER
    assert (tools.choice, tools.function, tools.parallel) == ("function", "add", False)
    chat = tool_set([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert (chat.choice, chat.function) == ("function", "get_weather")
    assert tool_set([WEATHER], "required").choice == "required"
    assert tool_set([WEATHER], "none").choice == "none"


def test_tool_set_none_without_tools():
    assert tool_set(None) is None
    assert tool_set([], "none") is None


@pytest.mark.parametrize(("tools", "choice", "parallel", "what", "words"), [
    ([{"type": "function", "function": {}}], None, None, "tools", "tools[0].function.name is missing"),
    ([WEATHER, {"type": "function", "function": {}}], None, None, "tools", "tools[1].function.name is missing"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, None, "tools", "tools[0].function.name"),
    ([{"type": "function", "name": "x" * 65}], None, None, "tools", "tools[0].name"),
    ([{"type": "web_search"}], None, None, "tools", "'web_search'"),
    ([{"function": {"name": "f"}}], None, None, "tools", "tools[0].type is missing"),
    ([WEATHER, WEATHER], None, None, "tools", "tools[1]"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, None, "tools", "parameters"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, None, "tools", "description"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], None, None, "tools", "strict"),
    ("get_weather", None, None, "tools", "list"),
    (None, "auto", None, "tool_choice", "tools"),
    (None, "required", None, "tool_choice", "tools"),
    ([WEATHER], "sometimes", None, "tool_choice", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "add"}}, None, "tool_choice", "'add'"),
    ([WEATHER], {"type": "function"}, None, "tool_choice", "tool_choice.function.name"),
    ([WEATHER], {"type": "mcp"}, None, "tool_choice", "'mcp'"),
    ([WEATHER], None, "yes", "parallel_tool_calls", "parallel_tool_calls"),
])
def test_tool_set_errors_name_the_field(tools, choice, parallel, what, words):
    with pytest.raises(OptionsError) as error:
        tool_set(tools, choice, parallel)
    assert error.value.what == what and words in error.value.problem


# -- templates and messages ---------------------------------------------------------------


def test_tools_in_template():
    assert tools_in_template("{%- if tools %}{{ tools | tojson }}{% endif %}")
    assert tools_in_template("{% for t in tools %}{{ t }}{% endfor %}")
    assert not tools_in_template("{{ '<|im_start|>system\nYou can use tools' }}{{ message['content'] }}")
    assert not tools_in_template("{% if custom_tools %}{% endif %} tools")
    assert not tools_in_template(None)


def test_render_joins_text_parts_and_maps_developer():
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "input_text", "text": "there"}]}]
    out, extra = render_messages(messages, None, template_has_tools=False)
    assert out == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert extra == {} and messages[0]["role"] == "developer"  # the input is not changed


def test_render_rejects_images_and_missing_content():
    image = [{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {}}]}]
    with pytest.raises(OptionsError, match=r"messages\[0\]\.content\[1\] is an 'image_url' part; this model"):
        render_messages(image, None, template_has_tools=False)
    with pytest.raises(OptionsError, match=r"messages\[1\]\.content"):
        render_messages([{"role": "system", "content": "x"}, {"role": "user", "content": None}], None,
                        template_has_tools=False)


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
]


def test_render_default_format():
    tools = tool_set([WEATHER, ADD])
    out, extra = render_messages(HISTORY, tools, template_has_tools=False)
    assert extra == {}
    system = out[0]
    assert system["role"] == "system"
    for tool in (WEATHER, ADD):
        assert json.dumps(tool["function"]["name"]) in system["content"]
        assert json.dumps(tool["function"]["parameters"]) in system["content"]
    assert '<tool_call>\n{"name": "<function name>", "arguments": <JSON object>}\n</tool_call>' in system["content"]
    assert out[2] == {"role": "assistant", "content": call("get_weather", {"city": "Paris"})}
    assert out[3] == {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}
    # The rendered history parses back into the same call.
    assert [(c.name, json.loads(c.arguments)) for c in parse_tool_calls(out[2]["content"])[1]] == [
        ("get_weather", {"city": "Paris"})]


def test_render_default_format_merges_into_system_and_says_must():
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out, _ = render_messages(messages, tool_set([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}),
                             template_has_tools=False)
    assert len(out) == 2 and out[0]["role"] == "system"
    assert out[0]["content"].endswith("You must call the function add.\n\nBe brief.")
    out, _ = render_messages(messages, tool_set([WEATHER], "required"), template_has_tools=False)
    assert "You must call at least one function." in out[0]["content"]
    out, _ = render_messages(messages, tool_set([WEATHER], "none"), template_has_tools=False)
    assert out[0] == {"role": "system", "content": "Be brief."}


def test_render_template_has_tools():
    tools = tool_set([WEATHER])
    out, extra = render_messages(HISTORY, tools, template_has_tools=True)
    assert extra == {"tools": [WEATHER]}
    assert out[0] == HISTORY[0]  # no system message of our own
    assert out[1]["content"] == "" and out[1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    with pytest.raises(OptionsError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
        render_messages([HISTORY[0], *bad], tools, template_has_tools=True)


# -- parsing ------------------------------------------------------------------------------


def calls_of(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_parse_one_and_two_calls():
    content, calls = parse_tool_calls(call("get_weather", {"city": "Paris"}))
    assert content is None and calls_of(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29
    assert calls[0].as_openai() == {"id": calls[0].id, "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    content, calls = parse_tool_calls(call("add", {"a": 1, "b": 2}) + "\n" + call("add", {"a": 3, "b": 4}))
    assert content is None and calls_of(calls) == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]
    assert calls[0].id != calls[1].id


def test_parse_text_and_call_and_forms():
    content, calls = parse_tool_calls("Let me check.\n" + call("get_weather", {"city": "Rome"}))
    assert content == "Let me check." and calls_of(calls) == [("get_weather", {"city": "Rome"})]
    # Arguments as a JSON string, "parameters" as their alias, an unterminated last block, the bare object.
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert calls_of(parse_tool_calls(text)[1]) == [("f", {"x": 1})]
    assert calls_of(parse_tool_calls('<tool_call>{"name": "f", "parameters": {"x": 1}}')[1]) == [("f", {"x": 1})]
    assert calls_of(parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_')[1]) == [("f", {})]
    assert parse_tool_calls(' {"name": "f", "arguments": {"x": 1}}\n')[0] is None
    assert calls_of(parse_tool_calls('{"name": "f", "arguments": {"x": 1}}')[1]) == [("f", {"x": 1})]
    assert parse_tool_calls('{"name": "f", "id": 1}') == ('{"name": "f", "id": 1}', [])
    assert parse_tool_calls('{"name": "f"} and more') == ('{"name": "f"} and more', [])


def test_parse_malformed_stays_in_content():
    bad = '<tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>'
    content, calls = parse_tool_calls("A " + bad + " " + call("g", {}))
    assert content == "A " + bad and calls_of(calls) == [("g", {})]
    assert parse_tool_calls('<tool_call>{"name": 3}</tool_call>') == ('<tool_call>{"name": 3}</tool_call>', [])
    assert parse_tool_calls("<tool_call>not json") == ("<tool_call>not json", [])
    assert parse_tool_calls("  ") == (None, [])


# -- streaming ----------------------------------------------------------------------------


def streamed(pieces: list[str]) -> tuple[str | None, list[tuple[str, dict]], list[str]]:
    stream, emitted, calls = ToolCallStream(), [], []
    for piece in pieces:
        content, done = stream.feed(piece)
        emitted.append(content)
        calls += done
    content, done = stream.finish()
    emitted.append(content)
    return "".join(emitted).strip() or None, calls_of(calls + done), emitted


TEXTS = [
    "Plain answer, a < b and <tool> and <tool_calls are fine.",
    "Let me check.\n" + call("get_weather", {"city": "Paris"}) + "\nDone.",
    call("add", {"a": 1, "b": 2}) + "\n" + call("add", {"a": 3, "b": 4}),
    "x <tool_call>\n{bad}\n</tool_call> y " + call("g", {}),
    '{"name": "f", "arguments": {"x": "}"}}',
    '{"name": "f", "arguments": {}} trailing',
    '{"other": 1}',
    '<tool_call>\n{"name": "f", "arguments": {"k": "v"}}\n</tool_ca',
    '<tool_call><tool_call>{"name": "f"}</tool_call>',
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_char_by_char_matches_whole(text):
    whole = parse_tool_calls(text)
    content, calls, _ = streamed(list(text))
    assert (content, calls) == (whole[0], calls_of(whole[1]))


def test_stream_emits_early_and_hides_blocks():
    stream = ToolCallStream()
    assert stream.feed("a <") == ("a ", [])
    assert stream.feed(" b") == ("< b", [])
    assert stream.feed(" <tool_c") == (" ", [])
    assert stream.feed('all>{"name": "f", "arguments": {}}') == ("", [])
    content, calls = stream.feed("</tool_call> end")
    assert content == " end" and calls_of(calls) == [("f", {})]
    assert stream.finish() == ("", [])


def test_stream_random_chunks_match_whole():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    atoms = st.sampled_from(["<tool_call>", "</tool_call>", "<", "tool", "\n", " ", "{", "}", '"name"', ": ",
                             '"f"', ", ", '"arguments"', "{}", '{"x": 1}', "hi", "_call>", "</"])

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(atoms, max_size=14), st.lists(st.integers(0, 200), max_size=6))
    def check(parts, cuts):
        text = "".join(parts)
        bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        whole = parse_tool_calls(text)
        assert streamed(pieces)[:2] == (whole[0], calls_of(whole[1]))
        assert streamed(list(text))[:2] == (whole[0], calls_of(whole[1]))

    check()


# -- grammar ------------------------------------------------------------------------------


def test_grammar_only_when_a_call_is_required():
    assert tool_grammar(tool_set([WEATHER])) is None
    assert tool_grammar(tool_set([WEATHER], "none")) is None
    assert "tool_1" in tool_grammar(tool_set([WEATHER, ADD], "required"))
    named = tool_grammar(tool_set([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}))
    assert '"add"' in named and "get_weather" not in named


def _source_tokenizer() -> Path | None:
    for root in (Path(shared_cache_dir()), Path("~/.cache/llmk").expanduser()):
        found = sorted((root / "sources").glob("SmolLM2-135M-Instruct*/tokenizer.json"))
        if found:
            return found[0]
    return None


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llguidance")
    pytest.importorskip("transformers")
    import llguidance.hf
    from transformers import PreTrainedTokenizerFast

    path = _source_tokenizer()
    if path is None:
        pytest.skip("needs the converted SmolLM2 in the llmk cache")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    return tok, llguidance.hf.from_tokenizer(tok, n_vocab=49152)


def _accepts(smollm2, grammar: str, text: str) -> bool:
    import llguidance

    tok, lltok = smollm2
    matcher = llguidance.LLMatcher(lltok, llguidance.grammar_from("lark", grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(tok.encode(text, add_special_tokens=False)) and matcher.is_accepting()


def test_grammar_validates():
    llguidance = pytest.importorskip("llguidance")
    refs = {"type": "function", "function": {"name": "where", "parameters": {
        "type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"],
        "$defs": {"Place": {"type": "string"}}}}}
    for tools in (tool_set([WEATHER, ADD, refs], "required"), tool_set([refs], "required", False),
                  tool_set([WEATHER, ADD], {"type": "function", "name": "add"})):
        grammar = llguidance.grammar_from("lark", tool_grammar(tools))
        assert llguidance.LLMatcher.validate_grammar(grammar) == ""


def test_grammar_matches_smollm2_tokens(smollm2):
    required = tool_grammar(tool_set([WEATHER, ADD], "required"))
    assert _accepts(smollm2, required, call("get_weather", {"city": "Paris"}))
    # Parallel calls follow each other with nothing between: after a call, a model chooses
    # between another "<tool_call>" and its end, not a newline it would always take.
    assert _accepts(smollm2, required, call("add", {"a": 1, "b": 2}) + call("get_weather", {"city": "Oslo"}))
    assert not _accepts(smollm2, required, call("get_wether", {"city": "Paris"}))
    assert not _accepts(smollm2, required, call("add", {"a": 1}))
    assert not _accepts(smollm2, required, "Sure! " + call("add", {"a": 1, "b": 2}))
    single = tool_grammar(tool_set([WEATHER, ADD], "required", False))
    assert not _accepts(smollm2, single, call("add", {"a": 1, "b": 2}) + call("add", {"a": 1, "b": 2}))
    named = tool_grammar(tool_set([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}))
    assert _accepts(smollm2, named, call("add", {"a": 1, "b": 2}))
    assert not _accepts(smollm2, named, call("get_weather", {"city": "Paris"}))
