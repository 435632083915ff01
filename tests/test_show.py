"""``vtprune show`` offline on the embedded synthetic LLaVA: its answers and masks are the ones a direct
prune + generate gives, and the PNG shows each method's kept tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.bench.accuracy import DEFAULT_MODEL
from vtprune.show import Entry, answer, encode, figure, main, run
from vtprune.synthetic.scenes import heldout

pytestmark = pytest.mark.skipif(not (Path(DEFAULT_MODEL) / "model.safetensors").is_file(),
                                reason="the embedded models/synthetic-llava is missing")


@pytest.fixture(scope="module")
def loaded():
    from vtprune.show import _load

    return _load(str(DEFAULT_MODEL), "auto")


def test_entries_equal_a_direct_prune_and_generate(loaded):
    model, processor = loaded
    sample = heldout(1, offset=3)[0]
    entries = run(model, processor, sample.image, sample.question, ["kcenter", "fastv:layer=2", "vscan"], keep=64)
    assert [e.label for e in entries] == ["unpruned", "kcenter", "fastv layer=2", "vscan"]
    assert entries[0].tokens.kept(0) == entries[0].tokens.total() == 576 and entries[0].stage == 0
    inputs = encode(processor, sample.image, sample.question)
    assert entries[0].answer == answer(model, processor, inputs, 16)  # the unpruned model's own answer
    for e, (method, kw) in zip(entries[1:], [("kcenter", {}), ("fastv", {"layer": 2}), ("vscan", {})]):
        with vtprune.prune(model, vtprune.method(method, **kw), keep=64) as h:
            assert e.answer == answer(model, processor, inputs, 16)
            direct = h.kept_masks()[0]
        assert all(torch.equal(a.kept, b.kept) and torch.equal(a.merged, b.merged)
                   for a, b in zip(e.tokens.grids, direct.grids))
    assert entries[3].schedule() == "vision 96 → layer:2 32"  # VScan's keep=64 is an average over layers
    assert not vtprune.handle_of(model)  # every handle removed


def test_stage_all_draws_every_stage(loaded, tmp_path):
    model, processor = loaded
    sample = heldout(1)[0]
    entries = run(model, processor, sample.image, sample.question, ["pdrop:budget_mode=last"], keep=64, stages="all")
    assert [e.tokens.kept(e.stage) for e in entries[1:]] == [192, 64]  # PyramidDrop's two stages on 4 layers
    path = figure([sample.image], entries, vtprune.adapter_for(model), tmp_path / "f.png", processor=processor)
    assert path.is_file()


def test_cli_runs_offline_on_a_file(tmp_path, capsys):
    sample = heldout(1, offset=5)[0]
    image = tmp_path / "scene.png"
    sample.image.save(image)
    out = tmp_path / "show.png"
    assert main([str(image), "--question", sample.question, "--methods", "random", "cls_attention",
                 "--keep", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random · 32/576 tokens" in printed and "cls_attention · 32/576 tokens" in printed
    from PIL import Image

    with Image.open(out) as im:
        assert im.width > 300 and im.height > 200


def test_cli_refuses_a_bad_method_before_loading(tmp_path):
    with pytest.raises(ValueError, match="kcentre"):
        main(["--methods", "kcentre", "--out", str(tmp_path / "x.png")])


def test_entry_caption():
    from vtprune.masks import ImageTokens

    tokens = ImageTokens(row=0, image=0, grids=[], stages=("prompt", "input kcenter"), gridless=[3, 1],
                         structural=[0, 0])
    assert Entry("kcenter", tokens, "blue").caption() == "kcenter · 1/3 tokens · answer: 'blue'"
