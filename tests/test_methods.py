"""Each method on planted structure that only a correct implementation passes, and each signal against an
independent computation (eager attention maps, which vtprune itself never requests)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune.budget import Budget
from cases import ROWS
from vtprune.methods.base import Method
from vtprune.methods.kcenter import divprune
from vtprune.methods.pool import grid_cells, spatial_pool
from vtprune.methods.random import random_scores
from vtprune.registry import METHODS
from vtprune.signals import Signals
from vtprune.testing.reference import masked_forward, pruned_rows
from vtprune.testing.tiny import IMAGE, build, make_inputs


@functools.cache
def _model(family: str, attn: str = "sdpa") -> torch.nn.Module:
    return build(family, attn)


# ------------------------------------------------------------------------------ kcenter (DivPrune)
def divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """The published loop, transcribed from the paper's description: O(k^2 N), one span."""
    xn = x / x.norm(dim=1, keepdim=True)
    d = 1 - xn @ xn.T
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(d, 2, dim=0, largest=False).values[1]
        else:
            scores = d[picks].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return picks


def test_kcenter_matches_the_reference_loop():
    x = torch.randn(3, 60, 16, dtype=torch.float64)
    got = divprune(x, 12)
    for s in range(3):
        assert got[s].tolist() == divprune_reference(x[s].float(), 12)


def test_kcenter_takes_one_token_per_planted_cluster():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 32, generator=g), dim=-1) * 5
    sizes = [40, 3, 17, 1, 25, 9]  # unbalanced: a top-k by anything density-like would miss the small ones
    x = torch.cat([c + 0.05 * torch.randn(n, 32, generator=g) for c, n in zip(centres, sizes)])
    label = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(x), generator=g)
    picks = divprune(x[perm][None], 6)[0]
    assert sorted(label[perm][picks].tolist()) == list(range(6))


def test_kcenter_first_pick_is_the_most_isolated_token():
    x = torch.randn(1, 30, 8)
    x[0, 17] = -x[0].mean(0) * 50  # far from everything: largest nearest-neighbour distance
    assert int(divprune(x, 3)[0, 0]) == 17


def test_kcenter_never_repeats_on_duplicates():
    x = torch.ones(1, 10, 4)  # all identical: distances are 0 everywhere
    picks = divprune(x, 5)[0]
    assert len(set(picks.tolist())) == 5


# ------------------------------------------------------------------------------ random
def test_random_is_seeded_per_span_and_uniform():
    a = random_scores([0, 1], 50, seed=3, device=torch.device("cpu"))
    b = random_scores([0, 1], 50, seed=3, device=torch.device("cpu"))
    c = random_scores([0, 1], 50, seed=4, device=torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a[0], a[1])
    counts = torch.zeros(40)
    for seed in range(400):
        counts[random_scores([0], 40, seed, torch.device("cpu"))[0].topk(10).indices] += 1
    assert counts.min() > 60 and counts.max() < 140  # expected 100 each


# ------------------------------------------------------------------------------ pool
@pytest.mark.parametrize("k,cell", [(64, 9), (144, 4), (36, 16), (576, 1)])
def test_pool_cuts_a_full_grid_into_equal_square_cells(k, cell):
    r, c = torch.arange(576) // 24, torch.arange(576) % 24
    cells = grid_cells(r, c, k)
    counts = torch.bincount(cells, minlength=k)
    assert counts.numel() == k and bool((counts == cell).all())
    for j in range(k):  # each cell is a solid rectangle
        rr, cc = r[cells == j], c[cells == j]
        assert (rr.max() - rr.min() + 1) * (cc.max() - cc.min() + 1) == cell


@pytest.mark.parametrize("k", [1, 5, 61, 100, 287, 575])
def test_pool_gives_exactly_k_nonempty_cells_for_any_k(k):
    grid = torch.stack([torch.zeros(576, dtype=torch.long), torch.arange(576) // 24, torch.arange(576) % 24], 1)
    cell, rep = spatial_pool(grid, k)
    counts = torch.bincount(cell, minlength=k)
    assert counts.numel() == k and bool((counts > 0).all())
    assert counts.max() <= 2 * counts.min() + 1  # near-equal areas
    assert len(set(rep.tolist())) == k and bool((cell[rep] == torch.arange(k)).all())


def test_pool_representative_is_the_cell_centre():
    grid = torch.stack([torch.zeros(576, dtype=torch.long), torch.arange(576) // 24, torch.arange(576) % 24], 1)
    _, rep = spatial_pool(grid, 64)  # 3x3 cells: the centre is (1, 1) of each
    assert sorted(rep.tolist())[:3] == [1 * 24 + 1, 1 * 24 + 4, 1 * 24 + 7]


def test_pool_splits_budget_over_grids_and_handles_holes():
    base = torch.stack([torch.zeros(16, dtype=torch.long), torch.arange(16) // 4, torch.arange(16) % 4], 1)
    canvas = torch.stack([torch.ones(48, dtype=torch.long), torch.arange(48) // 8, torch.arange(48) % 8], 1)
    grid = torch.cat([base, canvas])
    cell, rep = spatial_pool(grid, 8)
    assert (rep < 16).sum() == 2 and (rep >= 16).sum() == 6  # 16:48 tokens -> 2:6 cells
    holes = grid[torch.arange(64) % 3 != 0]
    cell, rep = spatial_pool(holes, 7)
    assert torch.bincount(cell, minlength=7).min() > 0


def test_pool_mean_merges_each_cell():
    grid = torch.stack([torch.zeros(36, dtype=torch.long), torch.arange(36) // 6, torch.arange(36) % 6], 1)
    x = torch.randn(1, 36, 5)
    sel = vtprune.method("pool").select(Signals.from_tensors(tokens=x, grid=grid[None]), 4)
    cell, rep = spatial_pool(grid, 4)
    for j in range(4):
        torch.testing.assert_close(sel.values[0, j], x[0, cell == j].mean(0))
    assert torch.equal(sel.index[0], rep)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_pool_mean_in_a_model_matches_a_reference_fed_the_pooled_embeddings(family):
    model = _model(family)
    inputs = make_inputs(model, ROWS)
    with vtprune.prune(model, "pool", ratio=0.5) as h:
        with torch.no_grad():
            out = model(**inputs).logits
        stats = h.stats
    with torch.no_grad():  # the LLM input the unpruned model builds
        feats = torch.cat(model.model.get_image_features(
            inputs["pixel_values"], **({"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {})
        ).pooler_output)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        embeds[inputs["input_ids"] == IMAGE] = feats
    # Pool again independently, span by span, on the grid of every image and write the cell means.
    pooled = embeds.clone()
    _write_pooled(model, inputs, pooled, embeds, stats)
    ref = masked_forward(model, {"inputs_embeds": pooled, "attention_mask": inputs["attention_mask"]}, stats)
    for b, rows in enumerate(pruned_rows(out, stats)):
        kept = stats.kept_positions[b]
        real = inputs["attention_mask"][b, kept].bool()
        torch.testing.assert_close(rows[real], ref[b, kept][real], atol=2e-5, rtol=1e-4)


def _write_pooled(model, inputs, pooled, embeds, stats):
    from vtprune.adapters.llava_next import LlavaNextAdapter

    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for b in range(embeds.shape[0]):
        pos = (inputs["input_ids"][b] == IMAGE).nonzero()[:, 0]
        if model.config.model_type == "llava":
            grid = torch.stack([torch.zeros(len(pos), dtype=torch.long), torch.arange(len(pos)) // side,
                                torch.arange(len(pos)) % side], 1)
            cand = pos
        else:  # rows = the runs between newline embeddings, after the base tile
            is_nl = (embeds[b, pos] == model.model.image_newline).all(-1)
            lay = LlavaNextAdapter._layout(torch.where(is_nl, -1, 0), 2 if len(pos) > side * side + 1 else 1, side, 0)
            grid, cand = lay.grid[~is_nl], pos[~is_nl]
        k = stats.stages[0].spans[b].kept
        cell, rep = spatial_pool(grid, k)
        for j in range(k):
            pooled[b, cand[rep[j]]] = embeds[b, cand[cell == j]].mean(0)


# ------------------------------------------------------------------------------ signals vs eager attention
@dataclass(frozen=True, kw_only=True)
class Probe(Method):
    """Keeps the first k candidates and records the signals it is given (a one-file method)."""

    name: ClassVar[str] = "probe"
    stage: ClassVar[str] = "vision"
    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention", "text_attention"})
    seen: ClassVar[list] = []
    read: str = "cls"

    def select(self, sig, k):
        if self.read == "cls":
            Probe.seen.append((sig.rows, sig.positions, sig.cls_attention()))
        else:
            Probe.seen.append((sig.rows, sig.positions, sig.text_attention(self.read, per_head=True)))
        return torch.arange(k).expand(sig.num_spans, k)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_cls_attention_equals_eager_vit_attention(family):
    model = _model(family, "eager")
    inputs = make_inputs(model, ROWS)
    Probe.seen.clear()
    with vtprune.prune(model, Probe(read="cls"), ratio=0.5):
        with torch.no_grad():
            model(**inputs)
    rows, positions, got = Probe.seen[0]
    with torch.no_grad():  # the eager ViT attention map: exactly what FasterVLM reads
        pv = inputs["pixel_values"]
        if family == "llava_next":
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            n = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 28) for s in inputs["image_sizes"]]
            pv = torch.cat([p[:k] for p, k in zip(pv, n)])
        att = model.model.vision_tower(pv, output_attentions=True).attentions[-2][:, :, 0, 1:].mean(1)  # (tiles, P)
        if family == "llava":
            expected = att
        else:  # push the scores through the model's own AnyRes packing
            feats = torch.split(att[..., None], n)
            packed, _ = model.model.pack_image_features(list(feats), inputs["image_sizes"], "default",
                                                        image_newline=torch.tensor([-1.0]))
            expected = torch.cat(packed)[:, 0]
    seq = torch.full(inputs["input_ids"].shape, float("nan"))
    seq[inputs["input_ids"] == IMAGE] = expected.reshape(-1)
    torch.testing.assert_close(got, seq[rows[:, None], positions], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("query", ["last", "instruction"])
def test_text_attention_equals_eager_llm_attention(family, query):
    model = _model(family, "eager")
    inputs = make_inputs(model, ROWS)  # left-padded batch
    Probe.seen.clear()
    with vtprune.prune(model, Probe(read=query, layer=2), ratio=0.5):
        with torch.no_grad():
            model(**inputs)
    rows, positions, got = Probe.seen[0]  # (S, H, N)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1: (B, H, L, L)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for s, b in enumerate(rows.tolist()):
        last_img = int((ids[b] == IMAGE).nonzero().max())
        if query == "last":
            q = [ids.shape[1] - 1]
        else:
            q = [i for i in range(last_img + 1, ids.shape[1]) if mask[b, i]]
        expected = att[b][:, q][:, :, positions[s]].mean(1)  # (H, N)
        torch.testing.assert_close(got[s], expected, atol=1e-6, rtol=1e-5)


def test_fastv_keeps_the_top_attended_tokens():
    model = _model("llava", "eager")
    inputs = make_inputs(model, ROWS[:1])
    with vtprune.prune(model, "fastv", layer=2, keep=5) as h:
        with torch.no_grad():
            model(**inputs)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)  # (L,)
    img = (inputs["input_ids"][0] == IMAGE).nonzero()[:, 0]
    expected = img[att[img].topk(5).indices].sort().values
    kept = h.stats.kept_positions[0]
    assert torch.equal(kept[torch.isin(kept, img)], expected)


def test_methods_run_on_plain_tensors():
    x = torch.randn(2, 40, 16)
    sig = Signals.from_tensors(tokens=x, cls_attention=torch.rand(2, 40), text_attention=torch.rand(2, 40),
                               grid=torch.stack([torch.zeros(40, dtype=torch.long), torch.arange(40) // 8,
                                                 torch.arange(40) % 8], 1).expand(2, 40, 3))
    for name in ["random", "pool", "kcenter", "cls_attention", "fastv"]:
        out = vtprune.method(name).select(sig, 7)
        idx = out.index if isinstance(out, vtprune.Selection) else out
        assert idx.shape == (2, 7) and all(len(set(r.tolist())) == 7 for r in idx)
    top = vtprune.method("cls_attention").select(sig, 7)
    assert set(top[0].tolist()) == set(sig.cls_attention()[0].topk(7).indices.tolist())


def _all_signals(S: int = 2, N: int = 40, D: int = 16, Dv: int = 12, H: int = 2, d: int = 8, T: int = 5) -> dict:
    """Every signal of vtprune.types.SIGNALS as plain tensors / callables (random, seeded)."""
    g = torch.Generator().manual_seed(0)
    r = functools.partial(torch.randn, generator=g)
    mask = torch.ones(S, T, dtype=torch.bool)
    mask[1, -2:] = False  # a shorter instruction in row 1
    grid = torch.stack([torch.zeros(N, dtype=torch.long), torch.arange(N) // 8, torch.arange(N) % 8], 1)
    return dict(
        tokens=r(S, N, D), projected=r(S, N, D), vit_features=r(S, N, Dv), vit_keys=r(S, N, H, d),
        vit_cls=r(S, N, Dv), cls_attention=r(S, N).softmax(-1), received_attention=r(S, N).softmax(-1),
        instruction=(r(S, T, D), mask), instruction_ids=(torch.randint(0, 50, (S, T), generator=g), mask),
        embed_tokens=torch.nn.Embedding(50, D), text_attention=r(S, N).softmax(-1), hidden_prev=r(S, N, D),
        text_attention_rows=r(S, T, N).softmax(-1),
        prev_queries=r(S, N, H, d), prev_keys={"visual": r(S, N, H, d), "text": (r(S, T, H, d), mask)},
        text_tokens=(r(S, T, D), mask), final_norm=torch.nn.RMSNorm(D), padding_fraction=torch.zeros(S, N),
        transition=r(S, N).abs(), projector=torch.nn.Linear(Dv, D), grid=grid.expand(S, N, 3),
        prompt_positions=torch.arange(N).expand(S, N) + 7, vit_depth=24, frame=torch.zeros(S, N, dtype=torch.long),
    )


# options a method needs before it can run without a model (a fitted curve, a small probe count)
_PLAIN_OPTIONS = {"debiased_attention": {"coef": (-1.0,)}, "zeroth_order": {"m": 8}, "dart": {"pivots": 2},
                  "todre_drop": {"layer": 2}}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_runs_on_plain_tensors(name):
    """The documented use without a model: exactly k distinct candidates per span, merges of width D."""
    with torch.no_grad():
        method = vtprune.method(name, **_PLAIN_OPTIONS.get(name, {})).resolve(32)
        layer = method.layers[-1] if method.layers else None
        signals, k, budget = _all_signals(), 7, None
        if method.span == "video":  # a video of 5 frames of 8, counted by the method's rule
            signals["frame"] = (torch.arange(40) // 8).expand(2, 40)
            signals["grid"] = torch.stack([torch.arange(40) // 8, torch.zeros(40, dtype=torch.long),
                                           torch.arange(40) % 8], 1).expand(2, 40, 3)
            budget = Budget(ratio=0.5)
            k = method.video_count(budget, 40, 5)
        sig = Signals.from_tensors(stage="layer" if layer is not None else method.stage, layer=layer, budget=budget,
                                   **signals)
        out = method.select(sig, k)
    sel = out if isinstance(out, vtprune.Selection) else vtprune.Selection(out)
    assert sel.index.shape == (2, k) and all(len(set(r.tolist())) == k for r in sel.index)
    assert int(sel.index.min()) >= 0 and int(sel.index.max()) < 40
    if sel.values is not None:
        assert sel.values.shape == (2, k, 16)
    if sel.drop is not None:
        assert sel.drop.shape == (2,) and sel.drop.dtype == torch.bool


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_refuses_non_finite_inputs(name, bad):
    """NaN / inf in any signal a method reads: a FloatingPointError naming the method and the signal, never an
    arbitrary selection or a raw linear-algebra error."""
    method = vtprune.method(name, **_PLAIN_OPTIONS.get(name, {})).resolve(32)
    layer = method.layers[-1] if method.layers else None
    signals = _all_signals()
    poisoned = []
    for key in method.required_signals(True) | method.required_signals(False):
        value = signals.get(key)
        for part in value.values() if isinstance(value, dict) else [value]:
            t = part[0] if isinstance(part, tuple) else part
            if torch.is_tensor(t) and t.is_floating_point() and t.dim() >= 2:
                t[:, 3] = bad  # one token of every span
                poisoned.append(key)
    if not poisoned:
        pytest.skip(f"{name} reads no floating-point signal")
    sig = Signals.from_tensors(stage="layer" if layer is not None else method.stage, layer=layer, **signals)
    with torch.no_grad(), pytest.raises(FloatingPointError, match="non-finite"):
        method.select(sig, 7)


def test_zeroth_order_refuses_a_projector_that_overflows():
    """Finite features, a projector whose output overflows: the sensitivity is refused, not ranked."""
    proj = torch.nn.Linear(12, 16)
    with torch.no_grad():
        proj.weight.fill_(3e38)
    sig = Signals.from_tensors(tokens=torch.randn(1, 40, 16), vit_features=torch.randn(1, 40, 12), projector=proj)
    with torch.no_grad(), pytest.raises(FloatingPointError, match="zeroth_order.*non-finite"):
        vtprune.method("zeroth_order", estimator="jvp", m=4).select(sig, 7)


def test_registering_a_method_is_one_class(monkeypatch):
    from vtprune.registry import METHODS

    @dataclass(frozen=True, kw_only=True)
    class Last(vtprune.ScoreMethod):
        name: ClassVar[str] = "keep_last"

        def score(self, sig):
            return sig.positions.float()

    monkeypatch.setitem(METHODS._entries, "keep_last", Last)
    model = _model("llava")
    inputs = make_inputs(model, ROWS[:1])
    with vtprune.prune(model, "keep_last", keep=3) as h:
        with torch.no_grad():
            model(**inputs)
    img = (inputs["input_ids"][0] == IMAGE).nonzero()[:, 0]
    kept = h.stats.kept_positions[0]
    assert torch.equal(kept[torch.isin(kept, img)], img[-3:])
    assert dataclasses.asdict(Last(keep=3))["keep"] == 3


@dataclass(frozen=True, kw_only=True)
class SignalProbe(Method):
    """Records every other signal (keeps the first k)."""

    name: ClassVar[str] = "signal_probe"
    requires: ClassVar[frozenset[str]] = frozenset({"tokens", "projected", "vit_features", "vit_keys",
                                                    "instruction", "hidden_prev", "projector", "grid"})
    seen: ClassVar[dict] = {}

    def select(self, sig, k):
        got = {"rows": sig.rows, "positions": sig.positions, "tokens": sig.tokens, "projected": sig.projected,
               "vit_features": sig.vit_features, "vit_keys": sig.vit_keys(), "instruction": sig.instruction,
               "projector": sig.projector, "grid": sig.grid}
        if sig.layer is not None:
            got["hidden_prev"] = sig.hidden_prev
        SignalProbe.seen[sig.layer] = got
        return torch.arange(k).expand(sig.num_spans, k)


def test_every_signal_matches_an_independent_computation():
    model = _model("llava")
    inputs = make_inputs(model, ROWS)
    SignalProbe.seen.clear()
    with vtprune.prune(model, [SignalProbe(), SignalProbe(layer=2)], keep=100):  # keep all: unpruned states
        with torch.no_grad():
            model(**inputs)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        vit = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    for layer, got in SignalProbe.seen.items():
        rows, pos = got["rows"], got["positions"]
        if layer is None:
            # projected == tokens == the LLM input rows; the projector maps vit_features onto them
            ref = out.hidden_states[0][rows[:, None], pos]
            torch.testing.assert_close(got["tokens"], ref)
            torch.testing.assert_close(got["projected"], ref)
            torch.testing.assert_close(got["projector"](got["vit_features"]), ref, atol=1e-6, rtol=1e-5)
            # keys of the feature layer (CLIP layer producing hidden state -2) at each token's patch
            attn_layer = model.model.vision_tower.encoder.layers[-2]
            keys = attn_layer.self_attn.k_proj(attn_layer.layer_norm1(vit[-3]))[:, 1:]  # (images, P, Dv)
            torch.testing.assert_close(got["vit_keys"], keys, atol=1e-6, rtol=1e-5)
            assert got["grid"][0, :5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
        else:
            torch.testing.assert_close(got["tokens"], out.hidden_states[layer][rows[:, None], pos])
            torch.testing.assert_close(got["hidden_prev"], out.hidden_states[layer - 1][rows[:, None], pos])
        emb, mask = got["instruction"]
        for s, b in enumerate(rows.tolist()):
            after = (ids[b] == IMAGE).nonzero().max() + 1
            torch.testing.assert_close(emb[s][mask[s]], embeds[b, after:])
