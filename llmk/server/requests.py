"""The request bodies of the OpenAI API, and what each field becomes in llmk.

Every field OpenAI documents is here, in one of three kinds: supported (it maps
to a library parameter), accepted with no effect (billing and bookkeeping
fields, said so in the README's table), or refused with a 400 that names it
(``REFUSED``): a client must never believe it got something it did not.
Fields OpenAI does not know are accepted and ignored, as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmk.server.errors import ApiError

#: Known fields llmk does not implement, with why; sending one (with a non-default value) is a 400.
REFUSED: dict[str, str] = {
    "audio": "this server generates text only",
    "modalities": "this server generates text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "this server has no web search",
    "functions": "the legacy `functions` field is not supported; send `tools`",
    "function_call": "the legacy `function_call` field is not supported; send `tool_choice`",
    "reasoning_effort": "the served models do not reason",
    "verbosity": "the served models have no verbosity setting",
    "suffix": "insertion (suffix) is not supported",
    "best_of": "best_of is not supported; send `n`",
    "store": "this endpoint stores nothing; use /v1/responses to keep a conversation",
}

#: Values of a refused field that mean "the default": sending those is fine.
_HARMLESS: dict[str, tuple[Any, ...]] = {"modalities": (["text"],), "best_of": (1,), "store": (False,)}


class Strict(BaseModel):
    """A body that refuses the known fields llmk does not implement (``check``)."""

    model_config = ConfigDict(extra="allow")

    def check(self) -> None:
        """Raise a 400 naming the first known-but-unsupported field sent."""
        for name, why in REFUSED.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value not in _HARMLESS.get(name, ()):
                raise ApiError(400, f"{name}: {why}", param=name, code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs `json_schema`")
        return self


def schema_constraint(schema: dict[str, Any], strict: bool | None) -> dict[str, Any]:
    """The JSON schema a response format constrains to. Non-strict (``strict: false``)
    skips the keywords the grammar engine cannot enforce (llguidance's lenient mode)
    instead of refusing the schema; otherwise such a schema is a 400 naming them."""
    if strict is False:
        return {**schema, "x-guidance": {**schema.get("x-guidance", {}), "lenient": True}}
    return schema


def format_constraint(response_format: ResponseFormat | None) -> dict[str, Any]:
    if response_format is None or response_format.type == "text":
        return {}
    if response_format.type == "json_object":
        return {"json_schema": {"type": "object"}}
    assert response_format.json_schema is not None
    spec = response_format.json_schema
    return {"json_schema": schema_constraint(spec.schema_, spec.strict)}


class GenerationBody(Strict):
    """What chat and text completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)  # and at most the server's max_choices
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    user: str | None = None
    # llmk's extensions (vLLM's names)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    regex: str | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1, description="Lark or GBNF")

    @model_validator(mode="after")
    def _stop(self) -> GenerationBody:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 sequences")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream: true")
        return self

    def sampling(self) -> dict[str, Any]:
        """The library's generation parameters (``max_tokens`` is settled by the server)."""
        fields = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": self.stop,
                  "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                  "logit_bias": self.logit_bias, "top_k": self.top_k, "repetition_penalty": self.repetition_penalty,
                  "regex": self.regex, "grammar": self.grammar}
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatBody(GenerationBody):
    messages: list[Message] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    def sampling(self) -> dict[str, Any]:
        fields = super().sampling() | format_constraint(self.response_format)
        if self.logprobs:
            fields |= {"logprobs": True, "top_logprobs": self.top_logprobs or 0}
        return fields


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _prompt(self) -> CompletionBody:
        if self.prompt in ("", []) or (isinstance(self.prompt, list) and any(p in ("", []) for p in self.prompt)):
            raise ValueError("prompt: every prompt must be non-empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def sampling(self) -> dict[str, Any]:
        fields = super().sampling()
        if self.logprobs is not None:
            fields |= {"logprobs": True, "top_logprobs": self.logprobs}
        return fields


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    #: "base64": little-endian float32 bytes, base64-encoded (what the openai client asks for).
    encoding_format: Literal["float", "base64"] = "float"
