"""ModelSpec and PassSpec: one validated description of what to load."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmk.errors import OptionsError
from llmk.spec import ModelSpec, PassSpec


@pytest.mark.parametrize(
    ("value", "name", "options"),
    [
        ("quantize", "quantize", {}),
        (" quantize ", "quantize", {}),
        ("quantize:", "quantize", {}),
        ("quantize:bits=4,group_size=64", "quantize", {"bits": 4, "group_size": 64}),
        ("quantize: bits = 4 , scheme=nf4 ,", "quantize", {"bits": 4, "scheme": "nf4"}),
        ("prune:ratio=0.5,fast=true,slow=False", "prune", {"ratio": 0.5, "fast": True, "slow": False}),
        ({"quantize": {"bits": 4}}, "quantize", {"bits": 4}),
        ({"quantize": None}, "quantize", {}),
        ({"name": "quantize", "options": {"bits": 8}}, "quantize", {"bits": 8}),
        ({"name": "quantize"}, "quantize", {}),
    ],
)
def test_pass_spec_forms(value, name, options):
    spec = PassSpec.parse(value)
    assert (spec.name, spec.options) == (name, options)
    assert PassSpec.parse(spec) is spec


def test_pass_spec_scalars_keep_their_types():
    options = PassSpec.parse("p:a=4,b=0.25,c=TRUE,d=int8,e=-3").options
    assert options == {"a": 4, "b": 0.25, "c": True, "d": "int8", "e": -3}
    assert [type(options[k]) for k in "abcde"] == [int, float, bool, str, int]


def test_pass_spec_str_is_the_cli_form_and_round_trips():
    spec = PassSpec.parse({"quantize": {"group_size": 64, "bits": 4}})
    assert str(spec) == "quantize:bits=4,group_size=64"
    assert PassSpec.parse(str(spec)) == spec
    assert str(PassSpec.parse("fuse")) == "fuse"


@pytest.mark.parametrize("value", ["quantize:bits", "quantize:=4", "quantize:bits=4,8"])
def test_pass_spec_bad_cli_form_names_the_pass_and_item(value):
    with pytest.raises(OptionsError) as info:
        PassSpec.parse(value)
    assert "quantize" in str(info.value) and "key=value" in str(info.value)


@pytest.mark.parametrize(
    "value",
    ["", ":bits=4", {"name": "quantize", "options": {}, "extra": 1}, {"name": ""}, {"a": {}, "b": {}}, 42,
     {"quantize": ["bits"]}],
)
def test_pass_spec_bad_forms_are_refused(value):
    # Raised directly, or through ModelSpec.build, always as OptionsError naming the model.
    with pytest.raises(OptionsError) as info:
        ModelSpec.build("model 'chat'", source="x", passes=[value])
    assert "model 'chat'" in str(info.value)


def test_model_spec_defaults_and_pass_shorthands():
    spec = ModelSpec.build("model 'm'", source="builtin:smollm2", passes="quantize:bits=4")
    assert (spec.backend, spec.device, spec.dtype, spec.max_batch_size) == ("auto", "auto", "auto", 8)
    assert spec.passes == (PassSpec(name="quantize", options={"bits": 4}),)
    assert ModelSpec.build("m", source="s", passes={"quantize": {"bits": 4}}).passes == spec.passes
    assert ModelSpec.build("m", source="s", passes=None).passes == ()


def test_model_spec_is_frozen_and_comparable():
    a = ModelSpec.build("m", source="s", passes=["fuse", "quantize:bits=4"], options={"threads": 2})
    b = ModelSpec.build("m", source="s", passes=["fuse", {"quantize": {"bits": 4}}], options={"threads": 2})
    assert a == b
    assert a != ModelSpec.build("m", source="s", passes=["quantize:bits=4", "fuse"], options={"threads": 2})
    with pytest.raises(ValidationError, match="frozen"):
        a.backend = "torch"  # type: ignore[misc]
    # A dump validates back into the same spec: what swap() relies on.
    assert ModelSpec.build("m", **a.model_dump()) == a


@pytest.mark.parametrize("key", ["sorce", "quantize", "max_tokens"])
def test_model_spec_refuses_unknown_keys_naming_them(key):
    with pytest.raises(OptionsError) as info:
        ModelSpec.build("model 'chat'", source="builtin:smollm2", **{key: 1})
    assert key in str(info.value) and "model 'chat'" in str(info.value)
    assert info.value.what == "model 'chat'"


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"source": ""}, "source"),
        ({"source": None}, "source"),
        ({"source": "s", "dtype": "int3"}, "dtype"),
        ({"source": "s", "max_batch_size": 0}, "max_batch_size"),
        ({"source": "s", "max_batch_size": 1000}, "max_batch_size"),
    ],
)
def test_model_spec_bad_values_name_the_key(fields, key):
    with pytest.raises(OptionsError) as info:
        ModelSpec.build("model 'chat'", **fields)
    assert str(info.value).count(key) >= 1
