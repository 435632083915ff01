"""Budget arithmetic, the Patcher's undo, the registry, and the LLaVA-NeXT layout."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
import torch.nn as nn

from vtprune.budget import Budget
from vtprune.patching import Patcher
from vtprune.registry import Registry


@pytest.mark.parametrize("ratio,n,kept", [(0.889, 576, 64), (0.75, 576, 144), (0.5, 576, 288), (0.0, 576, 576),
                                           (0.99, 10, 1), (0.5, 5, 2), (0.5, 7, 4), (0.902, 576, 56)])
def test_ratio_budget(ratio, n, kept):
    assert Budget(ratio=ratio).count(n) == kept  # max(1, round((1 - ratio) * n)), round half to even


def test_keep_budget():
    b = Budget(keep=64)
    assert [b.count(n) for n in (0, 10, 64, 576)] == [0, 10, 64, 64]
    with pytest.raises(ValueError, match="exactly one"):
        Budget()


def test_patcher_undoes_everything_lifo_and_twice():
    m = nn.Linear(2, 2)
    p = Patcher()
    calls = []
    p.pre_hook(m, lambda mod, a, k: calls.append("pre"))
    p.post_hook(m, lambda mod, a, k, out: calls.append("post"))
    p.set_attr(m, "flag", 1)
    p.set_attr(m, "flag", 2)
    orig_forward = m.forward
    p.wrap_method(m, "forward", lambda f: (lambda x: f(x) * 0))
    assert torch.equal(m(torch.ones(1, 2)), torch.zeros(1, 2)) and calls == ["pre", "post"]
    assert len(p) == 5
    p.undo()
    p.undo()
    assert "flag" not in m.__dict__ and "forward" not in m.__dict__ and m.forward == orig_forward
    assert not m._forward_hooks and not m._forward_pre_hooks and len(p) == 0


def test_patcher_hooks_a_module_whose_class_replaces_call():
    """vLLM's torch.compile-able modules call ``self.forward`` from their own ``__call__`` (hooks never run): with
    ``via_forward`` the Patcher wraps their forward instead (a pre-hook may replace the arguments, as with torch's
    hooks; wrappers nest in installation order, so a later post-hook sees the arguments the module was called
    with)."""

    class Direct(nn.Linear):
        def __call__(self, *args, **kwargs):
            return self.forward(*args, **kwargs)

    m, seen = Direct(2, 2), []
    p = Patcher()
    p.pre_hook(m, lambda mod, a, k: ((a[0] * 0,), k), via_forward=True)
    p.post_hook(m, lambda mod, a, k, out: seen.append((a[0].sum().item(), out.shape)), via_forward=True)
    x = torch.ones(1, 2)
    assert torch.equal(m(x), m.bias[None].detach()) and seen == [(2.0, (1, 2))]
    p.undo()
    assert "forward" not in m.__dict__ and not torch.equal(m(x), m.bias[None].detach())


def test_registry_did_you_mean_aliases_and_entry_points(monkeypatch):
    class EP:
        name, value = "beta", "collections:Counter"

    monkeypatch.setattr(metadata, "entry_points", lambda group: [EP()] if group == "vtprune.test_widgets" else [])
    reg = Registry("widget", "vtprune.test_widgets")
    reg.add("alpha", "collections:OrderedDict", aliases=("a",))
    assert reg.get("a") is reg.get("alpha")
    with pytest.raises(ValueError, match="Did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", "x:y")
    import collections

    assert reg.get("beta") is collections.Counter and "beta" in reg.names()


def test_method_files_register_themselves_on_first_use():
    import subprocess
    import sys

    code = ("import sys, vtprune; from vtprune.registry import METHODS; "
            "before = [m for m in sys.modules if m.startswith('vtprune.methods.')]; "
            "names = METHODS.names(); print(before, 'fastv' in names, METHODS.canonical('divprune'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True", "kcenter"]  # nothing imported before the first lookup

    from vtprune.methods.random import RandomPrune

    reg = Registry("widget", "vtprune.test_widgets")
    with pytest.raises(ValueError, match="registered as 'other'"):
        reg.register("other")(RandomPrune)  # its class attribute says "random"
    reg.register("random")(RandomPrune)
    reg.register("random")(RandomPrune)  # the same class again (a module reload) is a no-op


def test_llava_next_layout_matches_the_real_newlines():
    from vtprune.testing.tiny import IMAGE, Row, build, make_inputs

    model = build("llava_next")
    for size in [(40, 50), (56, 28), (28, 28), (30, 30)]:
        inputs = make_inputs(model, [Row(image_size=size)])
        from vtprune.adapters.base import VisionRecord
        from vtprune.adapters.llava_next import LlavaNextAdapter

        adapter = LlavaNextAdapter(model)
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        record = VisionRecord()
        adapter.image_layouts("image", (inputs["pixel_values"], inputs["image_sizes"]), {}, out, record)
        feats = out.pooler_output[0]
        lay = record.images[0]
        is_nl = (feats == model.model.image_newline).all(-1)
        assert torch.equal(lay.src == -1, is_nl)
        # every canvas row: tokens then its newline, all with one line id and consecutive columns
        for line in lay.line.unique().tolist():
            if line < 0:
                continue
            members = (lay.line == line).nonzero()[:, 0]
            assert bool(is_nl[members[-1]]) and not bool(is_nl[members[:-1]].any()) or len(members) == feats.shape[0]
        # base tile: raster grid, group 0
        assert lay.grid[:4].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
        assert int((inputs["input_ids"] == IMAGE).sum()) == lay.num_tokens


def test_newlines_all_keeps_every_newline_and_the_same_candidates():
    """``newlines="all"``: the candidates kept are those of the default rule, plus every newline (a count known
    before selection); the default drops a newline whose canvas row lost all its tokens."""
    import vtprune
    from vtprune.testing.tiny import IMAGE, Row, build, make_inputs

    model = build("llava_next")
    inputs = make_inputs(model, [Row(image_size=(40, 50)), Row(image_size=(56, 28))])
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    vis = inputs["input_ids"] == IMAGE
    is_nl = torch.zeros_like(vis)
    is_nl[vis] = torch.cat([(f == model.model.image_newline).all(-1) for f in feats])
    kept = {}
    for rule in ("row", "all"):
        with vtprune.prune(model, "kcenter", keep=3, newlines=rule) as h, torch.no_grad():
            model(**inputs)
            kept[rule] = [torch.isin(torch.arange(vis.shape[1]), k) for k in h.stats.kept_positions]
    for b in range(vis.shape[0]):
        cand = vis[b] & ~is_nl[b]
        assert torch.equal(kept["row"][b] & cand, kept["all"][b] & cand)
        assert bool(kept["all"][b][is_nl[b]].all())
        assert int((kept["all"][b] & vis[b]).sum()) == 3 + int(is_nl[b].sum())
    assert any(not bool(k[n].all()) for k, n in zip(kept["row"], is_nl))  # the default rule did drop some
    with pytest.raises(ValueError, match="newlines='some'.*'row', 'all'"):
        vtprune.prune(model, "kcenter", keep=3, newlines="some")


@pytest.mark.parametrize("total,weights,sizes", [(32, [1, 0.9, 0.001, 0.001], [16] * 4), (10, [1, 1, 1], [3, 5, 9]),
                                                  (100, [0.2, 0.5], [30, 40]), (5, [1e-3] * 8, [4] * 8)])
def test_temporal_allocation_is_exact_bounded_and_proportional(total, weights, sizes):
    out = Budget.allocate(total, weights, sizes)
    assert sum(out) == min(total, sum(sizes))
    assert all(1 <= o <= s for o, s in zip(out, sizes)) or total < len(sizes)
    if total >= len(sizes) and len(set(sizes)) == 1:  # more weight never gets fewer tokens
        order = sorted(range(len(out)), key=lambda i: -weights[i])
        assert all(out[a] >= out[b] for a, b in zip(order, order[1:]))


def test_temporal_budget_gives_repeated_frames_fewer_tokens():
    import vtprune
    from vtprune.testing.tiny import Row, build, make_inputs

    model = build("qwen2_vl")
    inputs = make_inputs(model, [Row(before=3, after=4, image_size=(56, 56), video_frames=8, seed=1)])
    pv = inputs["pixel_values_videos"]
    per = int(inputs["video_grid_thw"][0, 1] * inputs["video_grid_thw"][0, 2])
    pv[2 * per : 3 * per] = pv[per : 2 * per]  # temporal groups 2 and 3 repeat group 1
    pv[3 * per : 4 * per] = pv[per : 2 * per]
    with vtprune.prune(model, "kcenter", ratio=0.5, budget="temporal") as h, torch.no_grad():
        model(**inputs)
    video = [s for s in h.stats.stages[0].spans if s.image == 1]
    assert [s.frame for s in video] == [0, 1, 2, 3]
    assert sum(s.kept for s in video) == sum(round(0.5 * s.n) for s in video)  # the video's total is kept
    assert video[2].kept == video[3].kept == 1 and video[1].kept > 1  # repeats: one token each
