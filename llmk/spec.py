"""What to load: the validated description of one model version.

The same ``ModelSpec`` comes from ``Kernel.load(...)`` keywords, the daemon's
YAML config and the admin API, so all three refuse bad input the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmk.errors import OptionsError, format_validation_error
from llmk.speculative import SpeculativeConfig

Dtype = Literal["auto", "fp32", "bf16", "fp16"]


class PassSpec(BaseModel):
    """One optimization pass in a pipeline: its name and raw options.

    The options are validated against the pass's own ``Options`` model when the
    pipeline is built, so that the error can name the pass.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> PassSpec:
        """Accept ``"quantize"``, ``"quantize:bits=4,group_size=64"`` (the CLI
        form), ``{"quantize": {"bits": 4}}`` (the YAML shorthand) or the full
        ``{"name": ..., "options": ...}``."""
        if isinstance(value, PassSpec):
            return value
        if isinstance(value, str):
            name, _, rest = value.partition(":")
            options: dict[str, Any] = {}
            for item in filter(None, (part.strip() for part in rest.split(","))):
                key, sep, raw = item.partition("=")
                if not sep or not key.strip():
                    raise OptionsError(f"pass {name!r}", f"expected key=value, got {item!r}")
                options[key.strip()] = _scalar(raw.strip())
            return cls(name=name.strip(), options=options)
        if isinstance(value, dict) and len(value) == 1 and "name" not in value:
            ((name, options),) = value.items()
            return cls(name=name, options=options or {})
        return cls.model_validate(value)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))


def _scalar(raw: str) -> Any:
    """``4`` -> 4, ``0.5`` -> 0.5, ``true`` -> True, anything else stays text."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UpdateSpec(BaseModel):
    """Periodic, gated fine-tuning of a model on new data (``llmk.update``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(min_length=1, description="a directory of JSONL files in llmk tune's format; a new or "
                                                "changed file is new data")
    every: str = Field("on change", description="how often to look for new data: a duration (30s, 15m, 1h, "
                                                "1d) or 'on change' (each time the kernel polls)")
    eval: str = Field(min_length=1, description="a text file (llmk tune's formats) the candidate must not do worse "
                                                "on than the serving model, by more than max_regression")
    min_improvement: float = Field(0.0, ge=0.0, lt=1.0, description="the candidate's perplexity on the new data's "
                                   "held-out samples must be this fraction lower than the serving model's")
    max_regression: float = Field(0.0, ge=0.0, description="the candidate's perplexity on eval may be at most "
                                  "this fraction higher than the serving model's (0.01 = +1%)")
    tune: dict[str, Any] = Field(default_factory=dict, description="llmk tune's options (rank, learning_rate, "
                                                                   "max_steps, ...)")
    threads: int = Field(1, ge=1, le=256, description="CPU threads the tuning may use")
    nice: int = Field(10, ge=0, le=19, description="the tuning process's nice level (serving keeps priority)")
    timeout: str = Field("2h", description="the longest an update's tuning and scoring may run (30s, 15m, 1h, "
                                          "1d); past it the worker is killed and the update fails")

    @field_validator("data", "eval")
    @classmethod
    def _absolute(cls, path: str) -> str:
        import os

        return os.path.abspath(os.path.expanduser(path))

    @field_validator("every")
    @classmethod
    def _every(cls, every: str) -> str:
        cls.seconds_of(every)
        return every

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, timeout: str) -> str:
        if cls.seconds_of(timeout, "timeout") is None:
            raise ValueError("timeout: a duration (30s, 15m, 1h, 1d), not 'on change'")
        return timeout

    @field_validator("tune")
    @classmethod
    def _tune_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        from llmk.tune import TuneOptions

        TuneOptions(**options)  # raises with the reason
        return options

    @staticmethod
    def seconds_of(every: str, field: str = "every") -> float | None:
        """``every`` in seconds; ``None`` for 'on change'. Errors name ``field``."""
        text = every.strip().lower()
        if text == "on change":
            return None
        number, unit = text[:-1], text[-1:]
        if unit.isdigit():
            number, unit = text, "s"
        try:
            seconds = float(number) * _UNITS[unit]
        except (KeyError, ValueError):
            raise ValueError(f"{field}: {every!r} is neither a duration (30s, 15m, 1h, 1d) nor 'on change'") from None
        if seconds <= 0:
            raise ValueError(f"{field}: {every!r} must be longer than 0")
        return seconds

    @property
    def interval(self) -> float | None:
        return self.seconds_of(self.every)

    @property
    def timeout_seconds(self) -> float:
        seconds = self.seconds_of(self.timeout)
        assert seconds is not None  # refused by the validator
        return seconds


class ModelSpec(BaseModel):
    """A model version: where it comes from and how it is served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="builtin:NAME, a model directory or a .gguf file")
    backend: str = Field("auto", description="a backend name, or auto for the fastest available")
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto")
    dtype: Dtype = "auto"
    passes: tuple[PassSpec, ...] = ()
    options: dict[str, Any] = Field(default_factory=dict, description="backend options")
    max_batch_size: int = Field(8, ge=1, le=256, description="sequences decoded together (continuous batching)")
    prefill_chunk: int = Field(256, ge=1, le=65536,
                               description="prompt tokens computed per engine step (chunked prefill)")
    kv_cache: int | str | None = Field(
        None, description="KV cache capacity: token positions (an int) or a size ('512MiB'); "
                          "default 1024 positions per sequence in flight, at least one full context up to 8192")
    prefix_caching: bool = Field(True, description="reuse the KV cache of prompt prefixes computed before")
    max_queued_prompt_tokens: int = Field(
        65536, ge=1, description="prompt tokens that may wait to be computed (queued or prefilling); a request "
                                 "beyond it is refused as the queue is full (429), not stalled behind them")
    max_ppl_increase: float | None = Field(
        None, ge=0.0, description="quality gate for the passes: allowed relative perplexity increase (0.01 = +1%)"
    )
    speculative: SpeculativeConfig = Field(
        default_factory=SpeculativeConfig, description="speculative decoding: method (ngram, draft, off), num_draft, "
                                                       "ngram_min/ngram_max, max_batch, min_acceptance")
    draft: str | None = Field(None, min_length=1, description="a draft model's source (same tokenizer), loaded on "
                                                              "the same backend and device for speculative decoding")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters, each served as the model NAME:ADAPTER: adapter name -> "
                                          "a peft adapter directory (llmk tune's)")
    update: UpdateSpec | None = Field(None, description="fine-tune on new data in the background and swap the "
                                                        "result in when it passes a quality gate")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        import os

        for name, path in adapters.items():
            if not name or any(c in name for c in ":/") or name != name.strip():
                raise ValueError(f"adapter name {name!r} must be non-empty, without ':', '/' or surrounding spaces")
            if not path:
                raise ValueError(f"adapter {name!r}: give its directory")
        # Absolute: the path identifies the adapter (and its merged variant in the cache).
        return {name: os.path.abspath(os.path.expanduser(path)) for name, path in adapters.items()}

    def base(self) -> ModelSpec:
        """The model itself, without its adapters and its update policy (what serves
        under its own name: changing either does not reload it)."""
        return self.model_copy(update={"adapters": {}, "update": None})

    def variant(self, adapter: str) -> ModelSpec:
        """What serves as ``NAME:adapter``: the adapter merged into the source first (the
        ``lora`` pass), then this spec's passes; no quality gate (an adapter is meant to
        change the model)."""
        lora = PassSpec(name="lora", options={"adapter": self.adapters[adapter]})
        return self.model_copy(update={"adapters": {}, "update": None, "passes": (lora, *self.passes),
                                       "max_ppl_increase": None})

    @model_validator(mode="before")
    @classmethod
    def _draft_implies_method(cls, data: Any) -> Any:
        """``draft`` implies ``speculative.method: draft`` unless the method is given."""
        if isinstance(data, dict) and data.get("draft") is not None:
            section = data.get("speculative")
            if section is None:
                return {**data, "speculative": {"method": "draft"}}
            if isinstance(section, dict) and "method" not in section:
                return {**data, "speculative": {**section, "method": "draft"}}
        return data

    @model_validator(mode="after")
    def _draft_method(self) -> ModelSpec:
        method = self.speculative.method
        if self.draft is not None and method != "draft":
            raise ValueError(f"a draft model is given but speculative.method is {method!r}: set it to 'draft' "
                             "or remove draft")
        if self.draft is None and method == "draft":
            raise ValueError("speculative.method 'draft' needs a draft model: add draft: SOURCE")
        return self

    @field_validator("kv_cache")
    @classmethod
    def _kv_cache(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str):
            from llmk.memory import parse_size

            parse_size(value, "kv_cache")  # raises with the reason
        elif value is not None and value < 1:
            raise ValueError("kv_cache must hold at least one token position")
        return value

    @field_validator("passes", mode="before")
    @classmethod
    def _parse_passes(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of passes, not {type(value).__name__}")
        return tuple(PassSpec.parse(item) for item in value)

    @classmethod
    def build(cls, what: str, **fields: Any) -> ModelSpec:
        """Validate ``fields`` into a spec, raising ``OptionsError`` naming ``what``."""
        try:
            return cls.model_validate(fields)
        except ValidationError as error:
            raise OptionsError(what, format_validation_error(error)) from None
        except OptionsError as error:
            raise OptionsError(what, str(error)) from None
