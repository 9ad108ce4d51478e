"""Plugin discovery, registration and the errors that name the culprit."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

import llmk
from llmk.errors import DuplicateNameError, PluginError, UnknownNameError
from llmk.testing import FakeBackend, FakePlugin, load_fake

THIRD_PARTY = '''
import llmk

class ThirdPartyBackend(llmk.Backend):
    name = "thirdparty"
    def load(self, artifact, *, device, dtype, options):
        raise NotImplementedError

@llmk.hookimpl
def register_backends(register):
    register.add(ThirdPartyBackend)
'''


BUILTINS = sorted(ep.name for ep in entry_points(group="llmk") if ep.dist is not None and ep.dist.name == "llmk")


def make_kernel(tmp_path: Path, **kwargs) -> llmk.Kernel:
    return llmk.Kernel(cache_dir=tmp_path / "cache", **kwargs)


def backend_plugin(name: str, *classes: type) -> object:
    """A throwaway in-process plugin that registers ``classes`` as backends."""

    class Plugin:
        @llmk.hookimpl
        def register_backends(self, register):
            for cls in classes:
                register.add(cls)

    plugin = Plugin()
    plugin.__name__ = name
    return plugin


def named_backend(backend_name: str) -> type[FakeBackend]:
    return type(f"Backend_{backend_name}", (FakeBackend,), {"name": backend_name})


# -- discovery ----------------------------------------------------------------------


def test_builtins_are_discovered_through_the_llmk_entry_point_group(tmp_path):
    assert {"torch", "sources"} <= set(BUILTINS)

    kernel = make_kernel(tmp_path, autoload=False)
    assert sorted(kernel.plugins.infos) == BUILTINS
    for name in BUILTINS:
        info = kernel.plugins.infos[name]
        assert (info.package, info.version, info.builtin) == ("llmk", llmk.__version__, True)
    registered = kernel.plugins.backends.get("torch")
    assert registered.plugin.name == "torch"
    assert registered.cls.__module__ == "llmk_backend_torch.backend"
    assert kernel.plugins.pm.get_plugin("sources").__name__ == "llmk.sources"


def test_each_kernel_has_its_own_plugin_manager(tmp_path, fake_plugin):
    with_fake = make_kernel(tmp_path, autoload=False, plugins=[fake_plugin])
    without = make_kernel(tmp_path, autoload=False)
    assert with_fake.plugins.pm is not without.plugins.pm
    assert "fake" in with_fake.plugins.backends.items
    assert "fake" not in without.plugins.backends.items
    assert "llmk-fake" not in without.plugins.infos


def test_third_party_plugin_is_discovered_with_its_package(tmp_path, install_dist):
    install_dist(THIRD_PARTY, ep_name="thirdparty", dist="llmk-thirdparty", version="1.2.3")
    kernel = make_kernel(tmp_path)
    info = kernel.plugins.infos["thirdparty"]
    assert (info.package, info.version, info.builtin) == ("llmk-thirdparty", "1.2.3", False)
    assert kernel.plugins.backends.get("thirdparty").plugin == info
    assert "torch" in kernel.plugins.backends.items


@pytest.mark.parametrize("how", ["argument", "env"])
def test_autoload_off_keeps_builtins_only(tmp_path, install_dist, monkeypatch, how):
    install_dist(THIRD_PARTY)
    if how == "env":
        monkeypatch.setenv("LLMK_DISABLE_PLUGIN_AUTOLOAD", "1")
        kernel = make_kernel(tmp_path)
    else:
        kernel = make_kernel(tmp_path, autoload=False)
    assert sorted(kernel.plugins.infos) == BUILTINS
    assert "thirdparty" not in kernel.plugins.backends.items


def test_autoload_env_zero_means_autoload(tmp_path, install_dist, monkeypatch):
    install_dist(THIRD_PARTY)
    monkeypatch.setenv("LLMK_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert "thirdparty" in make_kernel(tmp_path).plugins.backends.items


@pytest.mark.parametrize("how", ["argument", "env"])
def test_disable_blocks_plugins(tmp_path, install_dist, monkeypatch, how):
    install_dist(THIRD_PARTY)
    if how == "env":
        monkeypatch.setenv("LLMK_DISABLE_PLUGINS", " torch , thirdparty ")
        kernel = make_kernel(tmp_path)
    else:
        kernel = make_kernel(tmp_path, disable=["torch", "thirdparty"])
    assert kernel.plugins.disabled == ["thirdparty", "torch"]
    assert "torch" not in kernel.plugins.backends.items and "thirdparty" not in kernel.plugins.backends.items
    assert sorted(kernel.plugins.infos) == sorted(set(BUILTINS) - {"torch"})


def test_disable_blocks_an_in_process_plugin_by_name(tmp_path, fake_plugin):
    kernel = make_kernel(tmp_path, autoload=False, plugins=[fake_plugin], disable=["llmk-fake"])
    assert "fake" not in kernel.plugins.backends.items


def test_a_plugin_that_fails_to_import_is_named_with_the_way_out(tmp_path, install_dist):
    install_dist("raise ImportError('no module named shiny_runtime')\n", ep_name="broken", dist="llmk-broken")
    with pytest.raises(PluginError) as info:
        make_kernel(tmp_path)
    assert info.value.plugin == "broken"
    assert "llmk-broken" in str(info.value) and "LLMK_DISABLE_PLUGINS=broken" in str(info.value)
    assert "torch" in make_kernel(tmp_path, disable=["broken"]).plugins.backends.items


# -- registration errors ------------------------------------------------------------


def test_duplicate_backend_names_name_both_plugins(tmp_path):
    first = backend_plugin("first-plugin", named_backend("dup"))
    second = backend_plugin("second-plugin", named_backend("dup"))
    with pytest.raises(DuplicateNameError) as info:
        make_kernel(tmp_path, autoload=False, plugins=[first, second])
    assert {info.value.first, info.value.second} == {"first-plugin", "second-plugin"}
    assert "first-plugin" in str(info.value) and "second-plugin" in str(info.value)
    assert info.value.name == "dup" and info.value.kind == "backend"


def test_a_name_clash_with_a_builtin_names_the_builtin(tmp_path):
    with pytest.raises(DuplicateNameError) as info:
        make_kernel(tmp_path, autoload=False, plugins=[backend_plugin("my-torch", named_backend("torch"))])
    assert {info.value.first, info.value.second} == {"my-torch", "torch"}


def test_two_plugins_with_the_same_name_are_refused(tmp_path):
    with pytest.raises(PluginError) as info:
        make_kernel(tmp_path, autoload=False,
                    plugins=[backend_plugin("twin", named_backend("a")), backend_plugin("twin", named_backend("b"))])
    assert info.value.plugin == "twin"


@pytest.mark.parametrize("thing", [object, int, "fake", FakeBackend()])
def test_registering_a_non_backend_names_the_plugin(tmp_path, thing):
    with pytest.raises(PluginError) as info:
        make_kernel(tmp_path, autoload=False, plugins=[backend_plugin("sloppy", thing)])
    assert info.value.plugin == "sloppy"
    assert "Backend" in str(info.value)


def test_a_backend_without_a_name_is_refused(tmp_path):
    class Nameless(FakeBackend):
        name = ""

    with pytest.raises(PluginError, match="no `name`") as info:
        make_kernel(tmp_path, autoload=False, plugins=[backend_plugin("nameless", Nameless)])
    assert info.value.plugin == "nameless"


def test_a_register_hook_that_crashes_names_the_plugin(tmp_path):
    class Crashing:
        __name__ = "crashing"

        @llmk.hookimpl
        def register_passes(self, register):
            raise KeyError("oops")

    with pytest.raises(PluginError, match="register_passes failed") as info:
        make_kernel(tmp_path, autoload=False, plugins=[Crashing()])
    assert info.value.plugin == "crashing"


def test_a_misspelled_hook_fails_kernel_creation(tmp_path):
    class Misspelled:
        @llmk.hookimpl
        def register_backend(self, register):  # the hook is register_backends
            register.add(FakeBackend)

    with pytest.raises(PluginError, match="register_backend") as info:
        make_kernel(tmp_path, autoload=False, plugins=[Misspelled()])
    assert "Misspelled" in str(info.value)


def test_a_misspelled_hook_in_an_installed_plugin_names_its_entry_point(tmp_path, install_dist):
    # The plugin name is what the operator passes to LLMK_DISABLE_PLUGINS, so the
    # error must carry the entry-point name, not the module's repr.
    install_dist("import llmk\n\n@llmk.hookimpl\ndef model_load(name):\n    pass\n", ep_name="typo")
    with pytest.raises(PluginError, match="model_load") as info:
        make_kernel(tmp_path)
    assert info.value.plugin == "typo"


def test_hook_implementations_with_unknown_arguments_are_refused(tmp_path):
    class WrongArgs:
        __name__ = "wrong-args"

        @llmk.hookimpl
        def model_unloaded(self, name, version, reason):
            pass

    with pytest.raises(PluginError) as info:
        make_kernel(tmp_path, autoload=False, plugins=[WrongArgs()])
    assert info.value.plugin == "wrong-args"
    assert "reason" in str(info.value)


# -- unknown names ------------------------------------------------------------------


def test_unknown_backend_lists_the_known_ones(kernel):
    with pytest.raises(UnknownNameError) as info:
        load_fake(kernel, "m", backend="tourch")
    known = sorted(kernel.plugins.backends.items)
    assert {"fake", "torch"} <= set(known) and info.value.known == known
    assert "'tourch'" in str(info.value) and ", ".join(known) in str(info.value)
    assert kernel.names() == []


class CopyPass(llmk.Optimizer):
    name = "copy"
    backends = frozenset({"fake"})

    def apply(self, artifact, out_dir, *, backend, options):
        for file in artifact.path.iterdir():
            if file.is_file() and not file.name.startswith("llmk-"):
                (out_dir / file.name).write_bytes(file.read_bytes())


class PassPlugin:
    __name__ = "copy-pass"

    @llmk.hookimpl
    def register_passes(self, register):
        register.add(CopyPass)


def test_unknown_pass_lists_the_known_ones(tmp_path, fake_plugin):
    kernel = make_kernel(tmp_path, autoload=False, plugins=[fake_plugin, PassPlugin()])
    with pytest.raises(UnknownNameError) as info:
        load_fake(kernel, passes=["qantize"])
    assert info.value.kind == "pass" and {"copy", "prune", "quantize"} <= set(info.value.known)
    assert "copy" in str(info.value)
    # The known pass does run, through register_passes.
    handle = load_fake(kernel, passes=["copy"])
    assert handle.version.artifact.path.parent.name == "passes"


def test_unknown_names_list_none_when_nothing_is_registered(tmp_path):
    kernel = make_kernel(tmp_path, autoload=False, disable=BUILTINS)
    with pytest.raises(UnknownNameError, match="known: none"):
        kernel.plugins.backends.get("torch")
    with pytest.raises(UnknownNameError, match="known: none"):
        kernel.plugins.passes.get("quantize")


# -- observer hooks -------------------------------------------------------------------


class Recorder:
    """Implements every observer hook and records the calls."""

    def __init__(self, name: str):
        self.__name__ = name
        self.calls: list[tuple] = []

    @llmk.hookimpl
    def model_load_started(self, name, version, spec):
        self.calls.append(("model_load_started", name, version, spec.source))

    @llmk.hookimpl
    def model_loaded(self, name, version, spec, backend, device, seconds):
        assert seconds >= 0
        self.calls.append(("model_loaded", name, version, backend, device))

    @llmk.hookimpl
    def model_load_failed(self, name, version, spec, error):
        self.calls.append(("model_load_failed", name, version, type(error).__name__))

    @llmk.hookimpl
    def model_unloaded(self, name, version):
        self.calls.append(("model_unloaded", name, version))


class Exploding:
    __name__ = "exploding"

    @llmk.hookimpl(tryfirst=True)
    def model_load_started(self, name):
        raise RuntimeError("boom")

    @llmk.hookimpl(tryfirst=True)
    def model_loaded(self, name):
        raise RuntimeError("boom")

    @llmk.hookimpl(tryfirst=True)
    def model_unloaded(self, version):
        raise RuntimeError("boom")


def test_observer_hooks_see_the_lifecycle(tmp_path, fake_plugin):
    recorder = Recorder("recorder")
    kernel = make_kernel(tmp_path, autoload=False, plugins=[fake_plugin, recorder])
    load_fake(kernel, "m")
    with pytest.raises(llmk.ModelLoadError):
        kernel.swap("m", options={"fail_load": True})
    kernel.swap("m", options={"salt": 1})
    kernel.unload("m")
    assert recorder.calls == [
        ("model_load_started", "m", 1, "fake:m"),
        ("model_loaded", "m", 1, "fake", "cpu"),
        ("model_load_started", "m", 2, "fake:m"),
        ("model_load_failed", "m", 2, "RuntimeError"),
        ("model_load_started", "m", 3, "fake:m"),
        ("model_loaded", "m", 3, "fake", "cpu"),
        ("model_unloaded", "m", 1),
        ("model_unloaded", "m", 3),
    ]


def test_a_failing_observer_is_isolated(tmp_path, fake_plugin):
    before, after = Recorder("before"), Recorder("after")
    kernel = make_kernel(tmp_path, autoload=False, plugins=[before, Exploding(), fake_plugin, after])
    handle = load_fake(kernel, "m")
    assert handle.generate("Hello", max_tokens=2, temperature=0).token_ids
    kernel.unload("m")
    expected = [("model_load_started", "m", 1, "fake:m"), ("model_loaded", "m", 1, "fake", "cpu"),
                ("model_unloaded", "m", 1)]
    assert before.calls == expected and after.calls == expected


def test_plugins_given_in_process_take_part_in_source_resolution(tmp_path, tiny_tokenizer):
    # FakePlugin.resolve_source answers fake:..., the built-in resolver the rest.
    kernel = make_kernel(tmp_path, autoload=False, plugins=[FakePlugin(tiny_tokenizer)])
    artifact = kernel.plugins.resolve_source("fake-embed:x", kernel.cache)
    assert (artifact.task, artifact.format, artifact.path) == ("embed", "hf", tiny_tokenizer)
