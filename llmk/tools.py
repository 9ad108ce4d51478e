"""OpenAI-style tool calling for chat models, as plain text and grammars.

Small chat models have no tool-calling API: they read the tools in their prompt and
write calls as text. This module validates OpenAI's ``tools`` / ``tool_choice``,
renders them into the messages, parses the calls back out of the generated text
(whole or streamed) and builds a llguidance grammar that forces valid calls when a
call is required. Nothing here touches a model.

A chat template that renders ``tools`` itself gets them as a template variable.
Otherwise the DEFAULT FORMAT (Hermes / Qwen style, which many small models know)
applies: a system message lists each tool as one JSON line
``{"name": ..., "description": ..., "parameters": ...}`` inside ``<tools></tools>``,
and the model calls a function by writing one block per call::

    <tool_call>
    {"name": "<function name>", "arguments": <JSON object>}
    </tool_call>

Calls in the history (assistant ``tool_calls``) are written back in the same form.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmk.errors import OptionsError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TEXT_PARTS = {"text", "input_text", "output_text"}
_BARE_KEYS = ("name", "arguments", "parameters")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
# Compact JSON with json.dumps' separators: what the prompt shows and the models write.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (what OpenAI returns)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolSet:
    """Validated `tools` + `tool_choice` + `parallel_tool_calls`."""

    tools: tuple[dict, ...]  # each {"type": "function", "function": {"name", "description"?, "parameters"}}
    choice: str  # "auto" | "none" | "required" | "function" (a named one)
    function: str | None  # the named function when choice == "function"
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def tool_set(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> ToolSet | None:
    """Validate OpenAI's tool options (chat or Responses API shapes); None when there are no tools."""
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise OptionsError("tools", "tools must be a list of function tools")
    normalized = tuple(_normalize_tool(t, i) for i, t in enumerate(tools or ()))
    names = [t["function"]["name"] for t in normalized]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise OptionsError("tools", f"tools[{i}] has the name {name!r} of tools[{names.index(name)}]")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise OptionsError("parallel_tool_calls", "parallel_tool_calls must be true or false")
    if not normalized:
        if tool_choice is None or tool_choice == "none":
            return None
        raise OptionsError("tool_choice", "tool_choice is only allowed when tools are given")
    function = None
    if tool_choice is None:
        choice = "auto"
    elif tool_choice in ("auto", "none", "required"):
        choice = tool_choice
    elif isinstance(tool_choice, dict):
        if (kind := tool_choice.get("type")) != "function":
            raise OptionsError("tool_choice", f"tool_choice.type is {kind!r}; only 'function' is supported")
        inner = tool_choice.get("function", tool_choice)  # chat API nests the name, the Responses API does not
        function = inner.get("name") if isinstance(inner, dict) else None
        if not isinstance(function, str):
            raise OptionsError("tool_choice", "tool_choice.function.name is missing")
        if function not in names:
            raise OptionsError("tool_choice", f"tool_choice names {function!r}, which is not among the tools")
        choice = "function"
    else:
        raise OptionsError("tool_choice", "tool_choice must be 'auto', 'none', 'required' or a named function")
    return ToolSet(normalized, choice, function, True if parallel_tool_calls is None else parallel_tool_calls)


def _normalize_tool(tool: Any, i: int) -> dict:
    if not isinstance(tool, dict):
        raise OptionsError("tools", f"tools[{i}] must be an object")
    if tool.get("type") != "function":
        kind = tool.get("type")
        raise OptionsError("tools", f"tools[{i}].type is {kind!r}; only 'function' tools are supported"
                           if kind is not None else f"tools[{i}].type is missing")
    nested = "function" in tool  # the chat API nests the function; the Responses API is flat
    fn, where = (tool["function"], f"tools[{i}].function") if nested else (tool, f"tools[{i}]")
    if not isinstance(fn, dict):
        raise OptionsError("tools", f"{where} must be an object")
    name = fn.get("name")
    if name is None:
        raise OptionsError("tools", f"{where}.name is missing")
    if not isinstance(name, str) or not _NAME.match(name):
        raise OptionsError("tools", f"{where}.name {name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$")
    out: dict[str, Any] = {"name": name}
    if fn.get("description") is not None:
        if not isinstance(fn["description"], str):
            raise OptionsError("tools", f"{where}.description must be a string")
        out["description"] = fn["description"]
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = dict(_EMPTY_PARAMETERS)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise OptionsError("tools", f"{where}.parameters must be a JSON schema of type 'object'")
    out["parameters"] = parameters
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise OptionsError("tools", f"{where}.strict must be true or false")
    return {"type": "function", "function": out}


def tools_in_template(chat_template: str | None) -> bool:
    """True when a Jinja chat template renders `tools` itself."""
    if not chat_template:
        return False
    for code in re.findall(r"\{[{%](.*?)[%}]\}", chat_template, re.S):
        code = re.sub(r"'[^']*'|\"[^\"]*\"", "", code)  # a word in a string literal is not the variable
        if re.search(r"(?<![\w.])tools\b", code):
            return True
    return False


def render_messages(messages: list[dict], tools: ToolSet | None, *,
                    template_has_tools: bool) -> tuple[list[dict], dict]:
    """(messages for the chat template, extra kwargs for ``apply_chat_template``)."""
    out = [_normalize_message(m, i, template_has_tools) for i, m in enumerate(messages)]
    if tools is None or tools.choice == "none":
        return out, {}
    if template_has_tools:
        return out, {"tools": [json.loads(json.dumps(t)) for t in tools.tools]}
    prompt = default_prompt(tools)
    for message in out:
        if message["role"] == "system":
            message["content"] = f"{prompt}\n\n{message['content']}" if message["content"] else prompt
            break
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def default_prompt(tools: ToolSet) -> str:
    """The system text of the default format."""
    lines = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools.tools)
    how = "one or more functions" if tools.parallel else "one function at a time"
    text = (f"# Tools\n\nYou may call {how} to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n"
            f'{OPEN}\n{{"name": "<function name>", "arguments": <JSON object>}}\n{CLOSE}')
    if tools.choice == "required":
        text += "\n\nYou must call at least one function." if tools.parallel else "\n\nYou must call one function."
    elif tools.choice == "function":
        text += f"\n\nYou must call the function {tools.function}."
    return text


def _normalize_message(message: Any, i: int, template_has_tools: bool) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise OptionsError("messages", f"messages[{i}] must be an object with a string role")
    out = dict(message)
    role = out["role"] = "system" if message["role"] == "developer" else message["role"]
    content = _text_content(message.get("content"), i)
    calls = message.get("tool_calls") if role == "assistant" else None
    if not template_has_tools or not calls:
        out.pop("tool_calls", None)
    if calls:
        calls = [_history_call(c, i, k) for k, c in enumerate(calls)]
        if template_has_tools:  # HF templates read tool_calls themselves, arguments as dicts
            out["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                  "function": {"name": name, "arguments": args}} for c, name, args in calls]
        else:
            blocks = "\n".join(f"{OPEN}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{CLOSE}"
                               for _, n, a in calls)
            content = f"{content}\n{blocks}" if content else blocks
    elif content is None and role not in ("assistant", "tool"):
        raise OptionsError("messages", f"messages[{i}].content is missing")
    out["content"] = content or ""
    return out


def _text_content(content: Any, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OptionsError("messages", f"messages[{i}].content must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in _TEXT_PARTS or kind == "refusal" or not isinstance(kind, str):
            raise OptionsError("messages", f"messages[{i}].content[{j}] is not a valid content part")
        else:
            raise OptionsError("messages",
                               f"messages[{i}].content[{j}] is an {kind!r} part; this model takes text only")
    return "".join(texts)


def _history_call(call: Any, i: int, k: int) -> tuple[dict, str, dict]:
    where = f"messages[{i}].tool_calls[{k}]"
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise OptionsError("messages", f"{where}.function.name is missing")
    args = _arguments(fn.get("arguments", {}))
    if args is None:
        raise OptionsError("messages", f"{where}.function.arguments is not a JSON object")
    return call, fn["name"], args


def _arguments(value: Any) -> dict | None:
    """A call's arguments as a dict: given as an object or as the JSON text of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def tool_grammar(tools: ToolSet) -> str | None:
    """A llguidance Lark grammar accepting only default-format calls, when a call is required."""
    if tools.choice not in ("required", "function"):
        return None
    chosen = [t["function"] for t in tools.tools
              if tools.choice == "required" or t["function"]["name"] == tools.function]
    # One %json rule per tool, not one anyOf: each schema keeps its own root, so `#/$defs/...` refs resolve.
    rules = [f"tool_{k}: %json {json.dumps(_call_schema(fn))}" for k, fn in enumerate(chosen)]
    alternatives = " | ".join(f"tool_{k}" for k in range(len(chosen)))
    # Calls follow each other with nothing between: after one, the model chooses between
    # another "<tool_call>" and its end (given a "\n" to write, a small model never stops).
    start = "start: call+" if tools.parallel else "start: call"
    return "\n".join([start, f'call: "<tool_call>\\n" ({alternatives}) "\\n</tool_call>"', *rules]) + "\n"


def _call_schema(fn: dict) -> dict:
    parameters = {k: v for k, v in fn["parameters"].items() if k not in ("$defs", "definitions")}
    schema = {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": parameters},
              "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": _JSON_STYLE}
    for key in ("$defs", "definitions"):  # hoisted to the root, where `#/$defs/X` points
        if key in fn["parameters"]:
            schema[key] = fn["parameters"][key]
    return schema


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls, stripped, or None if empty; the calls) from a whole reply."""
    stream = ToolCallStream()
    content, calls = stream.feed(text)
    rest, more = stream.finish()
    return (content + rest).strip() or None, calls + more


def _call(text: str, *, bare: bool = False) -> ToolCall | None:
    """A call from the JSON text of a block (or a bare reply: no other keys), or None when it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if bare and not set(obj) <= set(_BARE_KEYS):  # a plain JSON answer that happens to have a "name"
        return None
    args = _arguments(obj.get("arguments", obj.get("parameters", {})))
    return None if args is None else ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _maybe_bare(text: str) -> bool:
    """Whether ``text`` may still grow into a bare ``{"name": ..., "arguments": ...}`` object.
    Once False it stays False for every continuation, which keeps streaming exact."""
    match = re.match(r'\s*\{\s*(?:"([^"\\]*)("?))?', text)
    if match is None:
        return not text.strip()
    key, closed = match.group(1), match.group(2)
    if match.end() == len(text) and not closed:
        return key is None or any(k.startswith(key) for k in _BARE_KEYS)
    return key is not None and bool(closed) and key in _BARE_KEYS


class ToolCallStream:
    """Incremental parser for streaming: feed text pieces as they are generated."""

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False
        self._bare = True  # held while the reply may be one bare JSON call
        self._bare_end: int | None = None  # where that JSON object ends, once complete

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content text safe to emit now, calls completed by this piece)."""
        self._buf += text
        if self._bare:
            if self._still_bare(text):
                return "", []
            self._bare = False
        return self._scan()

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Flush at the end of generation; an unterminated block that parses is a call."""
        if self._bare:
            self._bare = False
            call = _call(self._buf, bare=True) if self._buf.strip() else None
            if call is not None:
                self._buf = ""
                return "", [call]
        content, calls = self._scan()
        rest, self._buf = self._buf, ""
        if self._inside:
            self._inside = False
            block = rest
            for k in range(len(CLOSE) - 1, 0, -1):  # generation may stop inside the closing tag
                if block.endswith(CLOSE[:k]):
                    block = block[:-k]
                    break
            call = _call(block)
            if call is not None:
                return content, calls + [call]
            rest = OPEN + rest
        return content + rest, calls

    def _still_bare(self, piece: str) -> bool:
        if not _maybe_bare(self._buf):
            return False
        if self._bare_end is None and "}" in piece:  # an object can only complete with a new "}"
            try:
                start = len(self._buf) - len(self._buf.lstrip())
                self._bare_end = json.JSONDecoder().raw_decode(self._buf, start)[1]
            except ValueError:
                pass
        return self._bare_end is None or not self._buf[self._bare_end:].strip()

    def _scan(self) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._inside:
                end = self._buf.find(CLOSE)
                if end < 0:
                    break
                block, self._buf = self._buf[:end], self._buf[end + len(CLOSE):]
                self._inside = False
                call = _call(block)
                if call is None:
                    out.append(OPEN + block + CLOSE)  # not a call: it stays in the content
                else:
                    calls.append(call)
            else:
                start = self._buf.find(OPEN)
                if start < 0:
                    # Hold back only a tail that could still become "<tool_call>".
                    keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self._buf.endswith(OPEN[:k])), 0)
                    cut = len(self._buf) - keep
                    out.append(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    break
                out.append(self._buf[:start])
                self._buf = self._buf[start + len(OPEN):]
                self._inside = True
        return "".join(out), calls
