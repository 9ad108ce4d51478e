"""Meta-tests that pin the plugin contract: every hook is documented, typed and tested."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from llmk import hookspecs

HOOKS = sorted(
    name for name, value in vars(hookspecs).items()
    if inspect.isfunction(value) and hasattr(value, f"{hookspecs.PROJECT}_spec")
)
TESTS = Path(__file__).parent
THIS = Path(__file__).name


def test_the_hook_list_is_what_the_kernel_registers():
    from llmk.plugins import Plugins

    assert len(HOOKS) >= 7
    pm = Plugins(autoload=False).pm
    assert sorted(name for name in vars(pm.hook) if not name.startswith("_")) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspec_is_documented_and_typed(hook):
    function = getattr(hookspecs, hook)
    doc = inspect.getdoc(function)
    assert doc and len(doc.split()) >= 5, f"{hook} needs a docstring saying when it is called and what it returns"
    signature = inspect.signature(function)
    assert signature.parameters, f"{hook} takes no arguments"
    for parameter in signature.parameters.values():
        assert parameter.annotation is not inspect.Parameter.empty, f"{hook}({parameter.name}) has no type"
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (
            f"{hook}({parameter.name}): hooks take named arguments only, no *args/**kwargs"
        )
    assert signature.return_annotation is not inspect.Signature.empty, f"{hook} has no return annotation"
    options = getattr(function, f"{hookspecs.PROJECT}_spec")
    if options.get("firstresult"):
        assert "firstresult" in doc, f"{hook} is firstresult; its docstring must say so"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    used_in = [
        path.name for path in TESTS.rglob("test_*.py")
        if path.name != THIS and re.search(rf"\bdef {hook}\(", path.read_text())
    ]
    assert used_in, f"no test implements the {hook} hook"
