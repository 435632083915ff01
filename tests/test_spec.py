"""One parser for method specs, whatever the entry point (CLI, sweep configs, lmms-eval model args, video script)."""

from __future__ import annotations

import pytest

import vtprune
from vtprune import spec


@pytest.mark.parametrize("text,want", [
    ("kcenter", ("kcenter", {})),
    ("fastv:layer=2:keep=64", ("fastv", {"layer": 2, "keep": 64})),
    ("transition:layer=[7,9,12]:fractions=(0.8,0.5,0.1)", ("transition", {"layer": [7, 9, 12],
                                                                          "fractions": [0.8, 0.5, 0.1]})),
    ("random:seed=3:ratio=0.5", ("random", {"seed": 3, "ratio": 0.5})),
    ("debiased_attention:coef=none:sink=1.5", ("debiased_attention", {"coef": None, "sink": 1.5})),
    ({"method": "fastv", "layer": "2"}, ("fastv", {"layer": 2})),
])
def test_parse(text, want):
    assert spec.parse(text) == want


def test_build_casts_to_the_fields_types():
    m = spec.build("transition:layer=7;9;12:fractions=[0.8,0.5,0.1]", ratio=0.5)
    assert m == vtprune.method("transition", layer=(7, 9, 12), fractions=(0.8, 0.5, 0.1), ratio=0.5)
    assert spec.build("fastv:layer=2.0").layer == 2
    with pytest.raises(ValueError, match="not key=value"):
        spec.parse("fastv:layer")
    with pytest.raises(ValueError, match="Unknown method 'fastvv'"):
        spec.build("fastvv:layer=2")
    with pytest.raises(ValueError, match="unknown argument"):
        spec.build("fastv:depth=2")


def test_every_entry_point_reads_specs_alike():
    from vtprune.cli import _selected
    from vtprune.eval_runner import parse_method
    from vtprune.video_qa import parse_kv

    text = "fastv:layer=3:keep=64"
    assert parse_method(text) == spec.parse(text)
    assert _selected([("fastv", {"layer": 2})], [text]) == [spec.parse(text)]
    assert _selected([("fastv", {"layer": 2})], ["fastv"]) == [("fastv", {"layer": 2})]  # the curated row
    assert parse_kv(["layer=[1,2]", "variant=todre"]) == {"layer": [1, 2], "variant": "todre"}
