"""Kept-token masks (vtprune.masks) and their drawing (vtprune.show) on every family: a planted selection must
light up exactly the planted cells, and the masks must agree with the engine's kept indices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import vtprune
from cases import ADAPTER_CASES, TWO_IMAGES, rows_for
from vtprune.masks import ImageTokens
from vtprune.methods.base import ScoreMethod
from vtprune.signals import Signals
from vtprune.testing.tiny import build, make_inputs


def field_value(key: torch.Tensor, row: torch.Tensor, col: torch.Tensor, salt: int) -> torch.Tensor:
    """A planted pseudo-random field over grid cells (distinct values: no ties)."""
    x = torch.sin(key.double() * 12.9898 + row.double() * 78.233 + col.double() * 37.719 + salt * 4.1414) * 43758.5453
    return x - torch.floor(x)


@dataclass(frozen=True, kw_only=True)
class Planted(ScoreMethod):
    """Keeps the cells where a planted field is highest; ``key`` is the grid's rank within the span (an image's
    base tile / canvas / tile, or a video's frame), as vtprune.masks numbers them (frame + group)."""

    name = "planted"
    stage = "input"
    requires = frozenset({"grid"})
    salt: int = 0

    def score(self, sig: Signals) -> torch.Tensor:
        g = sig.grid  # (S, N, 3)
        key = torch.stack([torch.unique(row[:, 0], return_inverse=True)[1] for row in g])  # (S, N) dense rank
        if bool((g[..., 0] < 0).any()):  # a grid-less [CLS] shifts the ranks of the grids by one
            key = torch.where((g[..., 0] >= 0).any(-1, keepdim=True) & (g[..., 0] < 0).any(-1, keepdim=True),
                              key - 1, key)
        v = field_value(key, g[..., 1], g[..., 2], self.salt).float()
        return torch.where(g[..., 0] >= 0, v, torch.full_like(v, -1.0))  # grid-less candidates last


def cells(im: ImageTokens) -> list[tuple[int, int, int, int, int]]:
    """(grid index, row, col, position, key) of every cell that holds a token."""
    out = []
    for i, g in enumerate(im.grids):
        for r, c in g.present.nonzero().tolist():
            out.append((i, r, c, int(g.positions[r, c]), g.frame + g.group))
    return out


def expected_top(im: ImageTokens, k: int, salt: int, among: set[int] | None = None) -> set[int]:
    """Positions of the k highest planted cells of ``im`` (optionally among the positions ``among``)."""
    cs = [c for c in cells(im) if among is None or c[3] in among]
    vals = field_value(torch.tensor([c[4] for c in cs]), torch.tensor([c[1] for c in cs]),
                       torch.tensor([c[2] for c in cs]), salt)
    order = torch.argsort(vals, descending=True)[:k]
    return {cs[i][3] for i in order.tolist()}


def lit(im: ImageTokens, stage: int) -> set[int]:
    return {int(g.positions[r, c]) for g in im.grids for r, c in g.kept[stage].nonzero().tolist()}


def rows_of(model):
    rows = list(rows_for(model))
    if not any(r.video_frames for r in rows):
        rows.append(TWO_IMAGES)
    return rows


@pytest.fixture(scope="module", params=ADAPTER_CASES)
def family(request):
    model = build(request.param)
    return request.param, model, make_inputs(model, rows_of(model))


def run(model, inputs, method, **kw) -> vtprune.PruneHandle:
    h = vtprune.prune(model, method, **kw)
    with torch.no_grad():
        model(**inputs)
    return h


def test_planted_selection_lights_up_the_planted_cells(family):
    name, model, inputs = family
    with run(model, inputs, Planted(), keep=5, budget="per_image") as h:
        masks = h.kept_masks()
        stats = h.stats
    assert len(masks) == sum(len({int(i) for i in stats.layout.image[b][stats.layout.visual[b]]})
                             for b in range(inputs["input_ids"].shape[0]))
    for im in masks:
        assert im.stages == ("prompt", "input planted")
        assert lit(im, 0) == {c[3] for c in cells(im)}  # the prompt: every cell
        assert lit(im, -1) == expected_top(im, 5, 0), f"{name} row {im.row} image {im.image}"
        assert im.gridless[-1] == 0


def test_masks_equal_the_engine_kept_indices(family):
    name, model, inputs = family
    with run(model, inputs, "random", ratio=0.6) as h:
        masks, stats = h.kept_masks(), h.stats
    lay = stats.layout
    for b in range(inputs["input_ids"].shape[0]):
        gridded = lay.cand[b] & (lay.grid[b, :, 0] >= 0)
        want = set(stats.kept_positions[b].tolist()) & set(gridded.nonzero()[:, 0].tolist())
        mine = [im for im in masks if im.row == b]
        assert set().union(*(lit(im, -1) for im in mine)) == want
        assert sum(im.kept() for im in mine) == stats.visual_after[b] - sum(im.structural[-1] for im in mine)
        # grids do not overlap, and every grid cell is one candidate of the prompt
        positions = [c[3] for im in mine for c in cells(im)]
        assert len(positions) == len(set(positions)) == int(gridded.sum())


def test_layer_stages_each_get_their_mask(family):
    """Two stages (before the LLM, then at layer 2): each stage's mask is its planted top-k among the survivors,
    and equals the engine's positions entering that layer."""
    name, model, inputs = family
    steps = [Planted(keep=8), Planted(salt=1, layer=2, keep=3)]
    with run(model, inputs, steps, keep=8, budget="per_image") as h:
        masks, stats = h.kept_masks(), h.stats
    for im in masks:
        assert im.stages == ("prompt", "input planted", "layer:2 planted")
        first = expected_top(im, 8, 0)
        assert lit(im, 1) == first
        assert lit(im, 2) == expected_top(im, 3, 1, among=first), f"{name} row {im.row}"
    for b in range(inputs["input_ids"].shape[0]):
        at2 = set(stats.positions_at(2)[b].tolist())
        assert set().union(*(lit(im, 2) for im in masks if im.row == b)) == at2 & set().union(
            *(lit(im, 0) for im in masks if im.row == b))


@pytest.mark.parametrize("method", ["visionzip", "vscan", "pool"])
def test_merged_tokens_are_marked(method):
    model = build("llava")
    inputs = make_inputs(model, rows_for(model))
    with run(model, inputs, method, keep=6) as h:
        masks, stats = h.kept_masks(), h.stats
    merged_stage = [s for s in stats.stages if any(p.numel() for p in s.merged_positions)]  # (empty: no merge)
    assert merged_stage, f"{method} merged nothing"
    for im in masks:
        for g in im.grids:
            assert not bool((g.merged & ~g.kept).any())  # only kept tokens carry merged values
        marked = {int(g.positions[r, c]) for g in im.grids for r, c in g.merged[-1].nonzero().tolist()}
        recorded = set().union(*(set(s.merged_positions[im.row].tolist()) for s in stats.stages if s.merged_positions))
        assert marked == recorded & lit(im, -1)
        assert marked, f"{method}: no merged token marked in row {im.row}"


def test_no_prefill_no_masks():
    model = build("llava")
    with vtprune.prune(model, "random", ratio=0.5) as h:
        assert h.kept_masks() == []


def test_drawing_shows_kept_cells_bright_and_dropped_dim(family):
    """Every family draws: each panel's kept cells keep the picture's pixels, dropped ones are dimmed."""
    from PIL import Image

    from vtprune.show import DROPPED, panels

    name, model, inputs = family
    with run(model, inputs, Planted(), keep=5, budget="per_image") as h:
        masks = h.kept_masks()
        adapter = h.adapter
    W, H = 64, 48
    picture = Image.new("RGB", (W, H), (200, 200, 200))
    for im in masks:
        named = panels([picture] * im.frames, im, adapter, height=96)
        expect = []  # per panel, the share of its area the kept cells cover
        for f in range(im.frames):
            grids = [g for g in im.grids if g.frame == f]
            shares: dict[str, float] = {}
            for g, b in zip(grids, adapter.grid_boxes(len(grids), (W, H))):
                area = (b.box[2] - b.box[0]) * (b.box[3] - b.box[1])
                shares[b.panel] = shares.get(b.panel, 0.0) + area * float(g.final.sum()) / g.final.numel()
            expect += list(shares.values())
        assert len(named) == len(expect)
        for (label, img), share in zip(named, expect):
            px = torch.tensor(list(img.getdata())).float()[:, 0]
            bright, dim = (px == 200).float().mean().item(), (px == round(200 * DROPPED)).float().mean().item()
            assert bright + dim == pytest.approx(1.0), f"{name} {label}: pixels neither kept nor dropped"
            assert bright == pytest.approx(share, abs=0.03), f"{name} {label}"


def test_grid_boxes_follow_the_processor():
    from vtprune.adapters.base import seen_box

    @dataclass
    class Crop:
        do_center_crop: bool = True
        size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 336})
        crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 336, "width": 336})

    class Pad:
        do_pad = True

        def pad_to_square(self):
            pass

    assert seen_box(Crop(), (400, 200)) == (0.25, 0.0, 0.75, 1.0)  # the centre half of a 2:1 picture
    assert seen_box(Crop(), (300, 300)) == (0.0, 0.0, 1.0, 1.0)
    assert seen_box(Pad(), (400, 200)) == (0.0, -0.5, 1.0, 1.5)  # a square canvas around a 2:1 picture
    assert seen_box(None, (400, 200)) == (0.0, 0.0, 1.0, 1.0)
    internvl = vtprune.adapter_for(build("internvl"))
    boxes = internvl.grid_boxes(7, (300, 200))  # 6 tiles of a 3:2 picture: 3 columns, 2 rows + thumbnail
    assert [b.panel for b in boxes] == ["tiles"] * 6 + ["thumbnail"]
    assert boxes[4].box == pytest.approx((1 / 3, 0.5, 2 / 3, 1.0))
