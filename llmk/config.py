"""The daemon's configuration: a YAML file validated with pydantic.

```yaml
server: {host: 127.0.0.1, port: 8000, admin_token_env: LLMK_ADMIN_TOKEN}
kernel: {cache_dir: ~/.cache/llmk, memory_budget: 8GiB}
plugins: {disable: []}
ray: {num_replicas: 2, max_models_per_replica: 2}   # llmk serve --ray only
models:
  chat:  {source: builtin:smollm2, backend: openvino, passes: [quantize], max_batch_size: 8}
  embed: {source: builtin:minilm, backend: onnxruntime}
```

A bad file is refused with one line per problem naming the key
(``models.chat.max_batch_size: Input should be greater than or equal to 1``).
``LLMK_HOST``, ``LLMK_PORT`` and ``LLMK_MEMORY_BUDGET`` override the file; the
command line's ``--host``/``--port``/``--cache-dir`` (``overrides``) override both,
and are validated like the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmk.errors import LlmkError, format_validation_error
from llmk.memory import parse_size
from llmk.monitor import AlertRule
from llmk.spec import ModelSpec

#: The environment variables that override the file, and the key each sets.
ENVIRONMENT = {"LLMK_HOST": ("server", "host"), "LLMK_PORT": ("server", "port"),
               "LLMK_MEMORY_BUDGET": ("kernel", "memory_budget")}

def default_models() -> dict[str, dict[str, Any]]:
    """What ``llmk serve`` serves without a config file: SmolLM2 in the fastest serving
    configuration measured (docs/BENCHMARKS.md), 16 streams at once; and MiniLM. That is
    int4 on onnxruntime, on the GGUF's own Q4_1 grid, which costs nothing (the quality gate
    holds it to +1%); without onnxruntime, ``auto`` with no pass (llama.cpp runs the file as
    it is; its ``bits=4`` would be Q4_K_M, lossy on this file)."""
    from llmk.backend import missing_modules

    chat: dict[str, Any] = {"source": "builtin:smollm2", "max_batch_size": 16}
    if missing_modules(("onnxruntime",)) is None:
        chat |= {"backend": "onnxruntime", "passes": ["quantize:bits=4"], "max_ppl_increase": 0.01}
    return {"smollm2": chat, "minilm": {"source": "builtin:minilm"}}


class ConfigError(LlmkError):
    """The configuration file (or its environment overrides) is invalid."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"invalid configuration {where}: {problem}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: The environment variable holding the bearer token of the management API.
    #: Without a token there, the management API is off.
    admin_token_env: str = "LLMK_ADMIN_TOKEN"
    #: Requests waiting per model beyond those being generated; more get 429.
    max_queue: int = Field(64, ge=0)
    #: Seconds a request may take in all (queue included) before it is cancelled.
    request_timeout: float = Field(300.0, gt=0)
    #: Seconds SIGTERM waits for running requests before the daemon exits.
    shutdown_timeout: float = Field(30.0, ge=0)
    #: Reload when the config file changes (SIGHUP and ``POST /admin/reload`` always do).
    watch_config: bool = True
    #: Largest prompt accepted, in tokens (the model's context also applies).
    max_prompt_tokens: int = Field(8192, ge=1)
    #: Largest ``max_tokens`` accepted.
    max_completion_tokens: int = Field(4096, ge=1)
    #: Largest request body, in bytes: a bigger one is refused (413) before it is read whole.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    #: Most texts in one embeddings request (OpenAI allows 2,048).
    max_embedding_inputs: int = Field(256, ge=1)
    #: Most choices (``n``) in one completion request.
    max_choices: int = Field(16, ge=1, le=128)
    #: Seconds a model's engine may have work and make no progress before the watchdog
    #: reports it and fails its stuck requests.
    stall_timeout: float = Field(120.0, gt=0)
    #: Directories the management API may load local models from (besides ``builtin:``
    #: and other registered sources, and the paths this file names). Empty: none.
    model_roots: list[str] = Field(default_factory=list)
    #: The web console at ``/`` (and its JSON at ``/console/state``); false: both are 404s.
    console: bool = True


class KernelConfig(_Section):
    cache_dir: str | None = None
    memory_budget: int | str | None = None
    drain_timeout: float = Field(60.0, ge=0)
    wait_timeout: float = Field(300.0, gt=0)
    alerts: list[AlertRuleConfig] = Field(default_factory=list)

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, value: Any) -> Any:
        parse_size(value)  # raises with the reason
        return value


class AlertRuleConfig(_Section):
    metric: str
    threshold: float
    min_requests: int = Field(10, ge=1)

    def rule(self) -> AlertRule:
        return AlertRule(self.metric, self.threshold, self.min_requests)  # type: ignore[arg-type]

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        from typing import get_args

        from llmk.monitor import AlertMetric

        if value not in get_args(AlertMetric):
            raise ValueError(f"unknown metric {value!r}; known: {', '.join(get_args(AlertMetric))}")
        return value


class PluginsConfig(_Section):
    disable: list[str] = Field(default_factory=list)
    autoload: bool = True


class AutoscalingConfig(_Section):
    """Ray Serve's autoscaling on ongoing requests per replica (its defaults where unset)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    #: Requests in flight per replica (queued or generating) that autoscaling aims for.
    target_ongoing_requests: float = Field(2.0, gt=0)
    #: Seconds the load must stay above (below) target before a replica is added (removed).
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    #: Seconds of history the load is averaged over.
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is more than max_replicas ({self.max_replicas})")
        return self


class ActorOptions(_Section):
    """What Ray reserves for each replica (its scheduler places replicas by these)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    #: Memory Ray reserves for the replica (a size: ``4GiB``); unset, none is reserved.
    memory: int | str | None = None
    #: Custom Ray resources (``{"accelerator_h100": 1}``).
    resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("memory")
    @classmethod
    def _size(cls, value: Any) -> Any:
        parse_size(value)
        return value

    def ray(self) -> dict[str, Any]:
        """Ray's ``ray_actor_options``."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            options["memory"] = parse_size(self.memory)
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class RayConfig(_Section):
    """How ``llmk serve --ray`` runs the config on Ray Serve (``llmk.ray``); ignored otherwise."""

    #: A fixed number of replicas; or ``autoscaling`` (not both).
    num_replicas: int | None = Field(None, ge=1)
    autoscaling: AutoscalingConfig | None = None
    #: Models one replica holds at once (least recently used unloaded first); the memory
    #: budget (``kernel.memory_budget``) also applies inside each replica.
    max_models_per_replica: int = Field(2, ge=1)
    #: Requests one replica takes at once (queued in its engine or generating); more wait in Ray.
    max_ongoing_requests: int = Field(64, ge=1)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    #: The Ray Serve application's name (one cluster may run several).
    app_name: str = Field("llmk", min_length=1)
    #: Times a request whose replica died is tried again on another one.
    max_retries: int = Field(3, ge=0)
    #: A stream's chunks leave its replica at most this often (the first at once): the tokens
    #: generated meanwhile travel together through the ingress and Ray's proxy, each hop
    #: costing CPU per chunk. 0 sends every chunk as it comes. Ray Serve LLM's default is 50.
    stream_interval_ms: float = Field(50.0, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_way(self) -> RayConfig:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give num_replicas or autoscaling, not both")
        return self


class ModelConfig(ModelSpec):
    """A model to serve: a ``ModelSpec`` plus how the lifecycle manager treats it."""

    pinned: bool = False
    keep_alive: float | None = Field(None, ge=0)

    def spec(self) -> ModelSpec:
        # Only what the config says: a default left unset stays a default the kernel may choose.
        return ModelSpec.model_validate(self.model_dump(exclude={"pinned", "keep_alive"}, exclude_unset=True))


KernelConfig.model_rebuild()


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    kernel: KernelConfig = Field(default_factory=KernelConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    models: dict[str, ModelConfig] = Field(default_factory=lambda: {
        name: ModelConfig.model_validate(fields) for name, fields in default_models().items()})

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in models:
            if not name or any(c in name for c in "/:") or name != name.strip():
                raise ValueError(f"model name {name!r} must be non-empty, without '/', ':' (NAME:ADAPTER names "
                                 "an adapter's variant) or surrounding spaces")
        return models


def load_config(path: str | Path | None, environ: dict[str, str] | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read and validate ``path`` (``None``: the defaults), with the environment
    overrides and then ``overrides`` (``{"server": {"port": 0}}``) applied.
    Raises ``ConfigError`` naming the file and the keys."""
    import yaml

    environ = os.environ if environ is None else environ
    where = "(defaults)"
    raw: Any = {}
    if path is not None:
        where = str(path)
        try:
            raw = yaml.load(Path(path).read_text(), Loader=_strict_loader()) or {}  # noqa: S506 - a SafeLoader
        except DuplicateKeyError as error:
            raise ConfigError(where, str(error)) from None
        except OSError as error:
            raise ConfigError(where, f"cannot read it: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(where, f"not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(where, f"the top level must be a mapping, not {type(raw).__name__}")
    given = [((section, key), environ[variable]) for variable, (section, key) in ENVIRONMENT.items()
             if environ.get(variable)]
    given += [((section, key), value) for section, values in (overrides or {}).items()
              for key, value in values.items() if value is not None]
    for (section, key), value in given:
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(where, f"{section}: must be a mapping")
        raw[section][key] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(where, format_validation_error(error)) from None


class DuplicateKeyError(ValueError):
    """A mapping in the file gives the same key twice."""


def _strict_loader() -> Any:
    """PyYAML's safe loader, refusing a key given twice in one mapping (where it
    would silently keep the last): two models under one name is a mistake."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    hash(key)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                if key in seen:
                    raise DuplicateKeyError(f"the key {key!r} is given twice (lines {seen[key]} and {line})")
                seen[key] = line
            return super().construct_mapping(node, deep)

    return StrictLoader
