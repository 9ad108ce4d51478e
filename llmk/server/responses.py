"""OpenAI's Responses API: ``POST /v1/responses`` (``stream: true`` as typed
server-sent events), ``GET`` and ``DELETE /v1/responses/{id}``.

A request becomes chat messages and runs as a chat completion does
(``ModelHandle.achat`` / ``achat_stream``, the same token cap, deadline, prompt
limit and error mapping as ``api.py``): ``instructions`` is a system message in
front, then the conversation of ``previous_response_id``, then the ``input``
items (messages, ``function_call`` and ``function_call_output`` items; text
only). The answer is a ``message`` output item for its text and one
``function_call`` item per tool call. Streamed, the same items are built event
by event in OpenAI's order, and the last event carries the whole response.

``store`` (true unless false, as OpenAI) keeps the response and the messages
that led to it in this process's memory: the last ``STORE_LIMIT``, oldest
dropped first, all lost on restart. That is enough for ``previous_response_id``
and ``GET`` with no database. Every request field is supported, accepted with
no effect, or refused with a 400 that names it (``ResponseBody.check``).
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmk.errors import OptionsError
from llmk.server.api import bounded, generation_params, model_for
from llmk.server.errors import ApiError, api_error, timed_out
from llmk.server.metrics import note
from llmk.server.requests import schema_constraint

if TYPE_CHECKING:
    from llmk.server.daemon import Daemon
    from llmk.tools import ToolCall

#: Stored responses kept for ``GET`` and ``previous_response_id``. In memory only: a
#: bounded cost (each holds its conversation, itself bounded by the prompt limit),
#: the oldest dropped first, nothing kept across a restart.
STORE_LIMIT = 1_000

_KEPT = (f"responses are kept in this server's memory only, the last {STORE_LIMIT:,} created with "
         "store: true, and are lost on restart")

#: Request fields OpenAI knows that llmk does not implement, with why: any value but null is a 400.
REFUSED: dict[str, str] = {
    "conversation": "conversations are not supported; continue one with previous_response_id",
    "prompt": "prompt templates are not supported; send instructions and input",
    "context_management": "context management (compaction) is not supported",
    "moderation": "this server does not moderate",
    "image": "this server generates text only",
}

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}


def _ident(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- the request ------------------------------------------------------------------------------


class TextFormat(BaseModel):
    """``text.format``: plain text, any JSON object, or JSON that validates against a schema."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a json_schema format needs `schema`")
        return self

    def constraint(self) -> dict[str, Any]:
        if self.type == "json_object":
            return {"json_schema": {"type": "object"}}
        if self.type == "json_schema":
            assert self.schema_ is not None
            return {"json_schema": schema_constraint(self.schema_, self.strict)}
        return {}

    def echo(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "name": self.name, "schema": self.schema_, "strict": self.strict,
                "description": self.description}


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat | None = None
    verbosity: str | None = None


class ResponseBody(BaseModel):
    """``POST /v1/responses``. Unknown fields are accepted and ignored, as elsewhere in llmk."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=0)
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    background: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check(self) -> None:
        """Raise a 400 naming the first field sent that llmk does not implement."""

        def refuse(param: str, why: str) -> ApiError:
            return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")

        for name, why in REFUSED.items():
            if (self.model_extra or {}).get(name) is not None:
                raise refuse(name, why)
        if self.background:
            raise refuse("background", "background responses are not supported; this server answers in the request")
        if self.truncation == "auto":
            raise refuse("truncation", "'auto' is not supported: a conversation longer than the model's context is "
                         "refused (400), never cut; send 'disabled' and drop earlier turns yourself")
        reasoning = self.reasoning or {}
        if reasoning.get("effort") not in (None, "none") or reasoning.get("summary") or reasoning.get(
                "generate_summary"):
            raise refuse("reasoning", "the served models do not reason")
        if self.include:
            raise refuse("include", f"{self.include[0]!r} cannot be included: this server returns no "
                         "log-probabilities, reasoning or built-in tool results")
        if self.top_logprobs:
            raise refuse("top_logprobs", "log-probabilities are not returned here; use /v1/chat/completions")
        if self.text is not None and self.text.verbosity is not None:
            raise refuse("text.verbosity", "the served models have no verbosity setting")
        metadata = self.metadata or {}
        if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            raise ApiError(400, "metadata: at most 16 pairs, keys up to 64 characters, values up to 512",
                           param="metadata")


def _text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or text parts (anything else is refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content parts", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = _TEXT_PARTS.get(kind)  # type: ignore[arg-type]
        if key is not None and isinstance(part.get(key), str):
            texts.append(part[key])
        elif key is not None or not isinstance(kind, str):
            raise ApiError(400, f"{where}[{j}] is not a valid content part", param="input")
        else:
            raise ApiError(400, f"{where}[{j}] is an {kind!r} part; this model takes text only", param="input")
    return "".join(texts)


def _is_object(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments or "{}"), dict)
    except ValueError:
        return False


def _call_message(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def input_messages(items: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The chat messages of ``input``: function calls join the assistant turn before them."""
    if items is None:
        raise ApiError(400, "input: required (a string or a list of items)", param="input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise ApiError(400, "input: give at least one item", param="input")
    messages: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None  # the turn that function_call items join
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type")
        if kind in (None, "message") and "role" in item:
            role = item["role"]
            if role not in _ROLES:
                raise ApiError(400, f"{where}.role is {role!r}; it must be one of {', '.join(_ROLES)}",
                               param="input")
            if item.get("content") is None:
                raise ApiError(400, f"{where}.content is missing", param="input")
            message = {"role": role, "content": _text(item["content"], f"{where}.content")}
            messages.append(message)
            assistant = message if role == "assistant" else None
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (isinstance(call_id, str) and call_id and isinstance(name, str) and name
                    and isinstance(arguments, str)):
                raise ApiError(400, f"{where}: a function_call item needs call_id, name and arguments (strings)",
                               param="input")
            if not _is_object(arguments):
                raise ApiError(400, f"{where}.arguments must be the JSON text of an object", param="input")
            if assistant is None:
                assistant = {"role": "assistant", "content": None}
                messages.append(assistant)
            assistant.setdefault("tool_calls", []).append(_call_message(call_id, name, arguments))
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise ApiError(400, f"{where}.call_id is missing", param="input")
            if output is None:
                raise ApiError(400, f"{where}.output is missing", param="input")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _text(output, f"{where}.output")})
            assistant = None
        elif kind == "item_reference":
            raise ApiError(400, f"{where}: item references are not supported; send the items themselves, or "
                           "previous_response_id", param="input")
        else:
            what = f"an item of type {kind!r}" if isinstance(kind, str) else "not an item (no type or role)"
            raise ApiError(400, f"{where} is {what}; this server takes messages, function_call and "
                           "function_call_output items", param="input")
    return messages


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the assistant's chat turns, for the next request."""
    messages: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None
    for item in output:
        if item["type"] == "message":
            assistant = {"role": "assistant", "content": "".join(p.get("text", "") for p in item["content"])}
            messages.append(assistant)
        elif item["type"] == "function_call":
            if assistant is None:
                assistant = {"role": "assistant", "content": None}
                messages.append(assistant)
            assistant.setdefault("tool_calls", []).append(
                _call_message(item["call_id"], item["name"], item["arguments"]))
    return messages


def _tool_name(tool: Any) -> Any:
    if not isinstance(tool, dict):
        return None
    inner = tool.get("function")
    return (inner if isinstance(inner, dict) else tool).get("name")


def tool_options(body: ResponseBody) -> tuple[dict[str, Any], bool]:
    """(the library's tool arguments, whether calls may come): ``allowed_tools`` narrows
    the tools; ``max_tool_calls`` 0 turns calling off and 1 asks for one call at a time."""
    from llmk.tools import tool_set

    tools, choice, parallel = body.tools, body.tool_choice, body.parallel_tool_calls
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        mode, allowed = choice.get("mode", "auto"), choice.get("tools")
        if mode not in ("auto", "required"):
            raise ApiError(400, "tool_choice.mode must be 'auto' or 'required'", param="tool_choice")
        if not isinstance(allowed, list) or not all(
                isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)
                for t in allowed):
            raise ApiError(400, "tool_choice.tools must list function tools as {'type': 'function', 'name': ...}; "
                           "only function tools are supported", param="tool_choice")
        names = {t["name"] for t in allowed}
        missing = sorted(names - {_tool_name(t) for t in tools or []})
        if missing:
            raise ApiError(400, f"tool_choice.tools names {missing[0]!r}, which is not among the tools",
                           param="tool_choice")
        tools, choice = [t for t in tools or [] if _tool_name(t) in names], mode
    if body.max_tool_calls == 0 and tools:
        if choice not in (None, "auto", "none"):
            raise ApiError(400, "max_tool_calls: 0 allows no call, and tool_choice asks for one",
                           param="max_tool_calls")
        choice = "none"
    elif body.max_tool_calls == 1:
        parallel = False
    try:
        toolset = tool_set(tools, choice, parallel)
    except OptionsError as error:
        raise ApiError(400, error.problem, param=error.what) from None
    active = toolset is not None and toolset.choice != "none"
    return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel}, active


# -- the response -----------------------------------------------------------------------------


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"] if isinstance(tool.get("function"), dict) else tool
    return {"type": "function", "name": fn["name"], "description": fn.get("description"),
            "parameters": fn.get("parameters"), "strict": fn.get("strict")}


def draft(body: ResponseBody) -> dict[str, Any]:
    """The response object before generation: what was asked, echoed as OpenAI echoes it."""
    extra = body.model_extra or {}

    def text_field(name: str) -> str | None:
        return extra[name] if isinstance(extra.get(name), str) else None

    text_format = body.text.format.echo() if body.text is not None and body.text.format is not None else {
        "type": "text"}
    return {
        "id": _ident("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "completed_at": None, "error": None, "incomplete_details": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls, "metadata": body.metadata or {}, "model": body.model, "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "prompt_cache_key": text_field("prompt_cache_key"),
        "reasoning": {"effort": None, "summary": None}, "safety_identifier": text_field("safety_identifier"),
        "service_tier": "default", "store": body.store is not False,
        "temperature": 1.0 if body.temperature is None else body.temperature, "text": {"format": text_format},
        "tool_choice": "auto" if body.tool_choice is None else body.tool_choice,
        "tools": [_echo_tool(t) for t in body.tools or []], "top_logprobs": 0,
        "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "usage": None,
        "user": body.user,
    }


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(text: str, status: str) -> dict[str, Any]:
    return {"id": _ident("msg"), "type": "message", "status": status, "role": "assistant",
            "content": [_text_part(text)]}


def _call_item(call: ToolCall, status: str = "completed", arguments: str | None = None) -> dict[str, Any]:
    return {"id": _ident("fc"), "type": "function_call", "status": status, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if arguments is None else arguments}


def _status(finish: str) -> str:
    return "incomplete" if finish == "length" else "completed"


def settle(response: dict[str, Any], status: str, prompt: int, completion: int) -> dict[str, Any]:
    response.update(status=status, usage=_usage(prompt, completion),
                    completed_at=int(time.time()) if status == "completed" else None,
                    incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None)
    return response


def _failure_code(error: ApiError) -> str:
    """The nearest of the codes OpenAI's ``ResponseError`` allows."""
    if error.status == 429:
        return "rate_limit_exceeded"
    return "invalid_prompt" if error.status == 400 else "server_error"


def _cancelled() -> ApiError:
    return ApiError(503, "the server stopped this generation (it is shutting down or unloading the model)",
                    "server_error", code="cancelled", headers={"Retry-After": "5"})


# -- storage ----------------------------------------------------------------------------------


@dataclass
class Stored:
    response: dict[str, Any]
    #: The chat messages through this response's output, ``instructions`` left out
    #: (OpenAI does not carry them over to the next response).
    conversation: list[dict[str, Any]]


class ResponseStore:
    """The last ``limit`` stored responses, oldest dropped first. Its methods are
    coroutines so that a store elsewhere (the fleet of ``llmk.ray``, shared by every
    replica) has the same interface; the daemon holds one as ``daemon.responses``."""

    def __init__(self, limit: int = STORE_LIMIT):
        self.limit = limit
        self._items: OrderedDict[str, Stored] = OrderedDict()

    async def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        self._items[response["id"]] = Stored(response, [*conversation, *output_messages(response["output"])])
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    async def get(self, ident: str) -> Stored | None:
        return self._items.get(ident)

    async def delete(self, ident: str) -> bool:
        return self._items.pop(ident, None) is not None

    def __len__(self) -> int:
        return len(self._items)


# -- the routes -------------------------------------------------------------------------------


def router(daemon: Daemon) -> APIRouter:
    api = APIRouter()

    def sampling(body: ResponseBody) -> dict[str, Any]:
        """The library's generation parameters, as for chat (``max_output_tokens`` for ``max_tokens``)."""
        fields: dict[str, Any] = {"temperature": body.temperature, "top_p": body.top_p}
        if body.text is not None and body.text.format is not None:
            fields |= body.text.format.constraint()
        return generation_params(daemon, body.max_output_tokens, "max_output_tokens", fields)

    async def stored(ident: str) -> Stored:
        found = await daemon.responses.get(ident)
        if found is None:
            raise ApiError(404, f"no response {ident!r}: {_KEPT}", param="response_id", code="not_found")
        return found

    @api.post("/v1/responses", response_model=None)
    async def create_response(request: Request, body: ResponseBody) -> Any:
        model = model_for(daemon, request, body.model)
        body.check()
        params = sampling(body)
        tools, calling = tool_options(body)
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            previous = await daemon.responses.get(body.previous_response_id)
            if previous is None:
                raise ApiError(400, f"previous_response_id: no response {body.previous_response_id!r}: {_KEPT}",
                               param="previous_response_id", code="previous_response_not_found")
            history = previous.conversation
        conversation = [*history, *input_messages(body.input)]
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        response = draft(body)

        async def keep(final: dict[str, Any]) -> None:
            if final["store"]:
                await daemon.responses.put(final, conversation)

        if body.stream:
            try:
                stream = model.achat_stream([*system, *conversation], **tools, **params)
            except Exception as error:
                raise api_error(error) from None
            await bounded(daemon, stream.start())  # bad input is a 4xx before any header is sent
            events = StreamEvents(response, body.max_tool_calls, hold_space=calling)
            return StreamingResponse(_sse(request, stream, events, keep, daemon.config.server.request_timeout),
                                     media_type="text/event-stream")
        result = await bounded(daemon, model.achat([*system, *conversation], **tools, **params))
        note(request, tokens_in=result.prompt_tokens, tokens_out=result.completion_tokens,
             finish_reason=result.finish_reason)
        if result.finish_reason == "timeout":
            raise timed_out(daemon.config.server.request_timeout)
        if result.finish_reason == "cancelled":
            raise _cancelled()
        status = _status(result.finish_reason)
        calls = result.tool_calls if body.max_tool_calls is None else result.tool_calls[:body.max_tool_calls]
        if result.text or not calls:
            response["output"].append(_message_item(result.text, status))
        response["output"].extend(_call_item(call) for call in calls)
        await keep(settle(response, status, result.prompt_tokens, result.completion_tokens))
        return response

    @api.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return (await stored(response_id)).response

    @api.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        await stored(response_id)
        await daemon.responses.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    return api


# -- streaming --------------------------------------------------------------------------------


class StreamEvents:
    """The typed events of a streamed response, built as its chunks arrive. Text opens a
    ``message`` item; a tool call closes it and is one ``function_call`` item, whole.
    While calls may come (``hold_space``), whitespace around the text is held back and
    dropped at the ends, as the unstreamed answer strips it."""

    def __init__(self, response: dict[str, Any], max_calls: int | None, *, hold_space: bool):
        self.response, self.output = response, response["output"]
        self.max_calls, self.hold_space = max_calls, hold_space
        self.sequence = itertools.count()
        self.message: dict[str, Any] | None = None  # the message item being written
        self.index = 0  # its output_index
        self.written = ""  # its text so far
        self.held = ""
        self.calls = 0

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(self.sequence), **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def text(self, piece: str) -> list[str]:
        if self.hold_space:
            whole = self.held + piece
            kept = whole.rstrip()
            self.held = whole[len(kept):]
            piece = kept if self.message is not None else kept.lstrip()
        if not piece:
            return []
        events = self.open() if self.message is None else []
        self.written += piece
        events.append(self.event("response.output_text.delta", item_id=self.message["id"],  # type: ignore[index]
                                 output_index=self.index, content_index=0, delta=piece, logprobs=[]))
        return events

    def open(self) -> list[str]:
        self.message = {"id": _ident("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
        self.index, self.written = len(self.output), ""
        self.output.append(self.message)
        return [self.event("response.output_item.added", output_index=self.index, item=self.message),
                self.event("response.content_part.added", item_id=self.message["id"], output_index=self.index,
                           content_index=0, part=_text_part(""))]

    def close(self, status: str) -> list[str]:
        if self.message is None:
            return []
        item, self.message, self.held = self.message, None, ""  # whitespace at its end is dropped
        part = _text_part(self.written)
        item.update(status=status, content=[part])
        where = {"item_id": item["id"], "output_index": self.index, "content_index": 0}
        return [self.event("response.output_text.done", **where, text=self.written, logprobs=[]),
                self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=self.index, item=item)]

    def call(self, call: ToolCall) -> list[str]:
        if self.max_calls is not None and self.calls >= self.max_calls:
            return []  # as OpenAI: calls past max_tool_calls are ignored
        self.calls += 1
        events = self.close("completed")
        item, index = _call_item(call, "in_progress", ""), len(self.output)
        self.output.append(item)
        events.append(self.event("response.output_item.added", output_index=index, item=item))
        events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=call.arguments))
        item.update(status="completed", arguments=call.arguments)
        events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 arguments=call.arguments))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def end(self, status: str) -> list[str]:
        """Close the answer: an empty message when nothing at all came."""
        events = self.open() if not self.output else []
        return events + self.close("incomplete" if status == "incomplete" else "completed")

    def fail(self, error: ApiError) -> None:
        if self.message is not None:
            self.message.update(status="incomplete", content=[_text_part(self.written)])
            self.message = None
        self.response.update(status="failed", error={"code": _failure_code(error), "message": error.message},
                             incomplete_details=None, completed_at=None)


async def _sse(request: Request, stream: Any, events: StreamEvents,
               keep: Callable[[dict[str, Any]], Awaitable[None]], timeout: float) -> AsyncIterator[str]:
    """The server-sent events of a response; the last one holds it whole (and it is
    stored first, so that a ``GET`` right after finds it). An error after the headers
    is a ``response.failed`` event. A client that leaves closes this generator, which
    cancels the generation; such a response is not stored."""
    response, tokens_out = events.response, 0
    note(request, tokens_in=stream.prompt_tokens, finish_reason="cancelled")  # unless the stream gets to its end
    try:
        yield events.event("response.created", response=response)
        yield events.event("response.in_progress", response=response)
        finish = None
        async for chunk in stream:
            tokens_out += len(chunk.token_ids)
            for line in events.text(chunk.text):
                yield line
            for call in chunk.tool_calls:
                for line in events.call(call):
                    yield line
            finish = chunk.finish_reason or finish
        if finish == "timeout":
            raise timed_out(timeout)
        if finish in (None, "cancelled"):
            raise _cancelled()
        note(request, finish_reason=finish)
        status = _status(finish)
        for line in events.end(status):
            yield line
        await keep(settle(response, status, stream.prompt_tokens, tokens_out))
        yield events.event(f"response.{status}", response=response)
    except Exception as error:  # headers are sent: report it in the stream, OpenAI-style
        failure = api_error(error)
        note(request, finish_reason=failure.code or "error", error=failure.message)
        events.fail(failure)
        response["usage"] = _usage(stream.prompt_tokens, tokens_out)
        await keep(response)
        yield events.event("response.failed", response=response)
    finally:  # also when the client went away: stop the generation now, not at garbage collection
        note(request, tokens_out=tokens_out)
        await stream.aclose()
