"""The daemon's configuration file: defaults, validation that names the key, and
environment overrides."""

from __future__ import annotations

import pytest

from llmk.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "llmk.yaml"
    path.write_text(text)
    return path


def test_without_a_file_it_serves_both_builtin_models():
    config = load_config(None, environ={})
    assert {name: m.source for name, m in config.models.items()} == {
        "smollm2": "builtin:smollm2", "minilm": "builtin:minilm"}
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)


def test_the_product_example_is_valid(tmp_path):
    config = load_config(write(tmp_path, """
server: {host: 127.0.0.1, port: 8000, admin_token_env: LLMK_ADMIN_TOKEN}
kernel: {cache_dir: ~/.cache/llmk, memory_budget: 8GiB}
plugins: {disable: []}
models:
  chat:  {source: builtin:smollm2, backend: openvino, passes: [quantize], max_batch_size: 8, pinned: true}
  embed: {source: builtin:minilm, backend: onnxruntime, keep_alive: 600}
"""), environ={})
    chat = config.models["chat"]
    assert chat.pinned and [str(p) for p in chat.spec().passes] == ["quantize"]
    assert chat.spec().max_batch_size == 8 and config.models["embed"].keep_alive == 600
    assert config.kernel.memory_budget == "8GiB"


@pytest.mark.parametrize(
    "text, message",
    [
        ("server: {port: eighty}", "server.port: Input should be a valid integer"),
        ("kernel: {memory_budget: lots}", "kernel.memory_budget: .*'lots' is not a size"),
        ("models: {chat: {source: builtin:smollm2, max_batch_size: 0}}", "models.chat.max_batch_size"),
        ("models: {chat: {source: builtin:smollm2, colour: red}}", "models.chat.colour: Extra inputs"),
        ("models: {chat: {backend: torch}}", "models.chat.source: Field required"),
        ("models: {chat: {source: x, passes: ['quantize:bits']}}", "models.chat.passes.*expected key=value"),
        ("kernel: {alerts: [{metric: speed, threshold: 1}]}", "unknown metric 'speed'"),
        ("surver: {}", "surver: Extra inputs are not permitted"),
        ("[1, 2]", "the top level must be a mapping"),
        ("server: {port: [", "not valid YAML"),
        ("ray: {num_replicas: 2, autoscaling: {max_replicas: 4}}", "ray: .*num_replicas or autoscaling, not both"),
        ("ray: {autoscaling: {min_replicas: 3, max_replicas: 2}}", r"ray.autoscaling: .*min_replicas \(3\) is more"),
        ("ray: {ray_actor_options: {memory: lots}}", "ray.ray_actor_options.memory: .*'lots' is not a size"),
        ("ray: {max_models_per_replica: 0}", "ray.max_models_per_replica: Input should be greater"),
        ("ray: {stream_interval_ms: -5}", "ray.stream_interval_ms: Input should be greater"),
        ("ray: {replicas: 2}", "ray.replicas: Extra inputs"),
        ("models: {'chat:x': {source: builtin:smollm2}}", "model name 'chat:x' must be .*':' \\(NAME:ADAPTER"),
        ("models: {chat: {source: builtin:smollm2, adapters: {'a/b': x}}}", "models.chat.adapters: .*adapter name"),
    ],
)
def test_a_bad_file_names_the_key_and_the_reason(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_the_ray_section_becomes_ray_serve_options(tmp_path):
    config = load_config(write(tmp_path, """
ray:
  autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}
  ray_actor_options: {num_cpus: 2, memory: 4GiB, resources: {big_node: 1}}
"""), environ={})
    assert config.ray.num_replicas is None and config.ray.autoscaling.max_replicas == 4
    assert config.ray.ray_actor_options.ray() == {"num_cpus": 2.0, "num_gpus": 0.0, "memory": 4 * 2**30,
                                                  "resources": {"big_node": 1.0}}


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read it"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "server: {port: 8000}\n")
    config = load_config(path, environ={"LLMK_PORT": "9001", "LLMK_HOST": "0.0.0.0", "LLMK_MEMORY_BUDGET": "2GiB"})
    assert (config.server.host, config.server.port, config.kernel.memory_budget) == ("0.0.0.0", 9001, "2GiB")
    with pytest.raises(ConfigError, match="server.port"):
        load_config(path, environ={"LLMK_PORT": "high"})
