"""``import llmk`` is cheap and has no side effects; heavy frameworks load only when a model does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "numpy", "tokenizers", "safetensors", "gguf", "onnxruntime", "openvino", "jinja2")


def imported_after(code: str, tmp_path) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the heavy top-level modules it imported."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({list(HEAVY)!r}))))
    """)
    env = {**os.environ, "LLMK_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("LLMK_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_llmk_loads_nothing_heavy(tmp_path):
    assert imported_after("import llmk", tmp_path) == []


def test_import_llmk_has_no_side_effects(tmp_path):
    code = """
        import logging, llmk
        assert not logging.getLogger().handlers, "the library must not configure logging"
    """
    assert imported_after(code, tmp_path) == []
    assert not (tmp_path / "cache").exists()


def test_creating_a_kernel_loads_no_framework(tmp_path):
    code = """
        import llmk
        kernel = llmk.Kernel()
        assert "torch" in kernel.plugins.backends.items
        assert llmk.ModelSpec and llmk.SamplingParams and llmk.Backend and llmk.Optimizer
    """
    assert imported_after(code, tmp_path) == []


def test_the_test_helpers_are_light(tmp_path):
    assert imported_after("import llmk.testing", tmp_path) == []


def test_public_names_resolve():
    import llmk

    for name in llmk.__all__:
        assert getattr(llmk, name) is not None, name
    with pytest.raises(AttributeError, match="NoSuchThing"):
        llmk.NoSuchThing  # noqa: B018
