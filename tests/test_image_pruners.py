"""VisPruner, HiPrune, HoloV and PyramidDrop on planted structure, and against list-based transcriptions of the
official selection loops (written from the reference's description, not from vtprune's code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from cases import ROWS
from vtprune.methods.base import Method
from vtprune.methods.hiprune import anchor_count, flat_neighbours
from vtprune.methods.holov import HoloV, allocate, crop_bounds, crop_score
from vtprune.methods.pyramid_drop import average_tokens, solve_lam
from vtprune.methods.vispruner import remove_duplicates
from vtprune.signals import Signals
from vtprune.testing.tiny import IMAGE, build, make_inputs


def _grid(n_side: int, S: int = 1) -> torch.Tensor:
    r = torch.arange(n_side * n_side)
    return torch.stack([torch.zeros_like(r), r // n_side, r % n_side], 1).expand(S, -1, 3)


# ----------------------------------------------------------------------------------------------------- VisPruner
def vispruner_reference(att: torch.Tensor, x: torch.Tensor, k: int, r: float = 0.5) -> list[int]:
    """One span, Python lists: important by attention, then rounds of bipartite duplicate removal."""
    order = sorted(range(att.numel()), key=lambda i: (-float(att[i]), i))
    n_imp = int(k * r)
    important, res = order[:n_imp], order[n_imp:]
    xn = x / x.norm(dim=-1, keepdim=True)
    while len(res) > k - n_imp:
        a, b = res[0::2], res[1::2]
        drop = min(8, len(res) - (k - n_imp), len(a))
        best = {i: max(float(xn[i] @ xn[j]) for j in b) for i in a}
        a = sorted(a, key=lambda i: (-best[i], a.index(i)))
        res = a[drop:] + b
    return sorted(important + res)


@pytest.mark.parametrize("k", [64, 17, 5])
def test_vispruner_matches_the_reference_loop(k):
    torch.manual_seed(0)
    N = 144
    att, x = torch.rand(2, N).softmax(-1), torch.randn(2, N, 32)
    sig = Signals.from_tensors(cls_attention=att, vit_features=x)
    got = vtprune.method("vispruner").select(sig, k)
    for s in range(2):
        assert got[s].tolist() == vispruner_reference(att[s], x[s], k)


def test_vispruner_keeps_the_top_attended_and_one_of_each_duplicate():
    torch.manual_seed(0)
    N, k = 64, 16
    centres = torch.randn(8, 32)
    x = centres[torch.arange(N) % 8] + 1e-3 * torch.randn(N, 32)  # 8 groups of 8 near-duplicates
    att = torch.rand(N) * 0.01
    att[[3, 40, 50]] = 1.0  # planted important tokens
    sig = Signals.from_tensors(cls_attention=att[None], vit_features=x[None])
    kept = vtprune.method("vispruner", important_ratio=0.25).select(sig, k)[0].tolist()  # 4 important, 12 diverse
    assert {3, 40, 50} <= set(kept)
    assert len({i % 8 for i in kept}) == 8  # the diverse rounds never leave a group unrepresented


def test_vispruner_refuses_bad_options():
    with pytest.raises(ValueError, match="important_ratio must be in"):
        vtprune.method("vispruner", important_ratio=1.5)
    with pytest.raises(ValueError, match="step must be an integer"):
        vtprune.method("vispruner", step=0)


def test_remove_duplicates_handles_an_odd_list():
    x = torch.randn(1, 11, 4)
    out = remove_duplicates(x, torch.arange(11)[None], 4)
    assert out.shape == (1, 4) and len(set(out[0].tolist())) == 4


# ------------------------------------------------------------------------------------------------------- HiPrune
def test_hiprune_anchor_counts_round_half_to_even():
    assert [anchor_count(k, 0.1) for k in (192, 128, 64, 125, 175)] == [4, 3, 1, 2, 4]  # 3.84 2.56 1.28 2.5 3.5


def test_hiprune_buffers_follow_the_references_flat_indices():
    grid = _grid(24)[0]
    nb = flat_neighbours(grid, torch.tensor([5 * 24, 0, 575, 30]))
    assert nb[0].tolist() == [5 * 24 - 1, 5 * 24 + 1, 4 * 24, 6 * 24]  # left of column 0 wraps to row 4's end
    assert nb[1].tolist() == [0, 1, 0, 24]  # clamped at the first cell
    assert nb[2].tolist() == [574, 575, 551, 575]
    assert nb[3].tolist() == [29, 31, 6, 54]


def test_hiprune_keeps_anchors_their_neighbours_and_top_registers():
    torch.manual_seed(0)
    N, k = 576, 192
    obj, deep = torch.rand(N) * 0.1, torch.rand(N)
    anchors = [100, 300, 301, 420]
    obj[anchors] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    sig = Signals.from_tensors(received_attention={9: obj[None], None: deep[None]}, grid=_grid(24))
    kept = set(vtprune.method("hiprune", object_layer=9).select(sig, k)[0].tolist())
    ab = set(anchors) | {a + d for a in anchors for d in (-1, 1, -24, 24)}
    assert ab <= kept
    rest = deep.clone()
    rest[list(ab)] = -1
    assert kept - ab == set(rest.topk(k - len(ab)).indices.tolist())


def test_hiprune_default_layers_follow_the_reference_per_tower():
    m = vtprune.method("hiprune")
    assert m.vit_layers_read(24, True) == (9, None)  # CLIP-L (LLaVA): HIPRUNE_OBJECT_LAYER=9
    assert m.vit_layers_read(32, False) == (16, None)  # Qwen2.5-VL: 16


# --------------------------------------------------------------------------------------------------------- HoloV
def test_holov_crops_and_budget_rule():
    assert crop_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    m = HoloV()
    assert [m.num_crops(576, k) for k in (64, 128, 192)] == [16, 8, 5]  # LLaVA's 16; the Qwen port's rule
    w = torch.tensor([0.5, 0.3, 0.2])
    assert allocate(w, [10, 10, 10], 7) == [4, 2, 1]  # floors 3 2 1, the one left over to the heaviest crop
    # the capped crop's excess goes to the others by weight
    assert allocate(torch.tensor([0.9, 0.05, 0.05]), [4, 10, 10], 10) == [4, 6, 0]


def test_holov_crop_score_is_the_mean_attention_up_to_a_constant():
    """The variance term is rescaled to the attention term's mean, so the allocation is by mean attention."""
    torch.manual_seed(0)
    a, x = torch.rand(36), torch.randn(36, 64)
    assert torch.allclose(crop_score(a, x, 0.09), 1.09 * 1000 * a.mean(), rtol=1e-4)


def test_holov_gives_the_attended_crop_more_tokens():
    torch.manual_seed(0)
    N, k = 576, 64
    a = torch.rand(N) * 0.01
    a[36:72] += 1.0  # crop 1 (of 16) carries the attention
    sig = Signals.from_tensors(cls_attention=a[None], tokens=torch.randn(1, N, 16))
    kept = vtprune.method("holov").select(sig, k)[0]
    assert kept.shape == (k,) and ((kept >= 36) & (kept < 72)).sum() == 36  # all of it: the rest spread


# --------------------------------------------------------------------------------------------------- PyramidDrop
def test_pdrop_solves_the_released_schedule_from_its_average():
    assert average_tokens(0.5, (8, 16, 24), 32, 576) == 270
    assert solve_lam(270, (8, 16, 24), 32, 576) == 0.5
    m = vtprune.method("pdrop", layer=(8, 16, 24))
    budget = vtprune.budget.Budget(keep=270)
    assert [m.keep_count(budget, 576, 576, 32, b) for b in (8, 16, 24)] == [288, 144, 72]
    last = vtprune.method("pdrop", layer=(8, 16, 24), budget_mode="last")
    assert [last.keep_count(vtprune.budget.Budget(keep=72), 576, 576, 32, b) for b in (8, 16, 24)] == [288, 144, 72]
    fixed = vtprune.method("pdrop", layer=(8, 16, 24), lam=0.5)  # the reference's own parameter
    assert [fixed.keep_count(budget, 576, 576, 32, b) for b in (8, 16, 24)] == [288, 144, 72]
    with pytest.raises(ValueError, match="below what layers"):
        solve_lam(100, (8, 16, 24), 32, 576)


def test_pdrop_first_stage_keeps_the_last_tokens_top_attention_of_its_own_layer():
    """Stage 1 at layer b ranks by layer b's attention on its (unpruned) input: eager attentions[b]."""
    model = build("llava", "eager")
    inputs = make_inputs(model, ROWS[:1])
    n_layers = model.config.text_config.num_hidden_layers
    with vtprune.prune(model, vtprune.method("pdrop", layer=(1, 2)), keep=8) as h:  # of 16: an average of 8
        with torch.no_grad():
            model(**inputs)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
    img = (inputs["input_ids"][0] == IMAGE).nonzero()[:, 0]
    n0 = img.numel()
    assert n0 == 16
    lam = solve_lam(8, (1, 2), n_layers, n0)
    expected = img[att[img].topk(int(n0 * lam + 1e-6)).indices].sort().values
    kept = h.stats.positions_by_layer[1][0]
    assert torch.equal(kept[torch.isin(kept, img)], expected)
    assert abs(h.stats.mean_visual_per_layer[0] - 0.5 * n0) <= 1  # the budget is the per-layer average
    # the second stage keeps fewer tokens than the budget's 8: it still runs (schedules go below k)
    assert [st.after[0] for st in h.stats.stages] == [int(n0 * lam + 1e-6), int(n0 * lam**2 + 1e-6)]


# ------------------------------------------------------------------------------------------------------ CDPruner
def test_cdpruner_greedy_is_the_greedy_determinant_maximiser():
    """Fast greedy MAP (incremental Cholesky) against the naive greedy: each pick maximises det(L_Y) (float64)."""
    from vtprune.methods.cdpruner import dpp_greedy

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(2, 30, 12, dtype=torch.float64), dim=-1)
    r = torch.rand(2, 30, dtype=torch.float64) + 0.1
    kernel = r[:, :, None] * (x @ x.transpose(1, 2)) * r[:, None, :]
    got = dpp_greedy(kernel.float(), 8)
    for s in range(2):
        chosen: list[int] = []
        for _ in range(8):
            dets = [torch.linalg.det(kernel[s][chosen + [i]][:, chosen + [i]]) if i not in chosen else -1.0
                    for i in range(30)]
            chosen.append(int(torch.tensor(dets).argmax()))
        assert got[s].tolist() == chosen


def test_cdpruner_prefers_relevant_tokens_and_covers_them_diversely():
    torch.manual_seed(0)
    D, N = 32, 60
    dirs = torch.nn.functional.normalize(torch.randn(6, D), dim=-1)
    x = dirs[torch.arange(N) % 6] + 0.05 * torch.randn(N, D)  # 6 clusters of 10
    z = (dirs[0] + dirs[1])[None, None]  # the instruction is about clusters 0 and 1
    sig = Signals.from_tensors(tokens=x[None], instruction=(z, torch.ones(1, 1, dtype=torch.bool)))
    m = vtprune.method("cdpruner")
    kept = m.select(sig, 4)[0].tolist()
    clusters = [i % 6 for i in kept]
    assert set(clusters) == {0, 1}  # only the relevant clusters, both covered
    r = m.relevance_of(sig)[0]
    assert r[torch.arange(N) % 6 < 2].min() > r[torch.arange(N) % 6 >= 2].max()
    with pytest.raises(ValueError, match="relevance='clip' needs clip="):
        vtprune.method("cdpruner", relevance="clip")
    with pytest.raises(ValueError, match="theta must be in"):
        vtprune.method("cdpruner", theta=1.0)


def test_cdpruner_clip_relevance_is_the_negative_cosine_to_the_question():
    """The official LLaVA recipe on a tiny random CLIP: r = minmax(-cos(visual_projection(post_layernorm(h)), t))."""
    from transformers import CLIPConfig, CLIPModel

    from vtprune.methods.cdpruner import minmax

    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 99, "max_position_embeddings": 16},
                     vision_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    clip = CLIPModel(cfg).eval()

    class Tok:  # the LLM's and CLIP's tokenizer: ids <-> words
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"w{i}" for i in ids) + " ASSISTANT:"

        def __call__(self, text, truncation=False, return_tensors="pt"):
            assert not text.endswith("ASSISTANT:")  # the chat template's marker is removed
            ids = [int(w[1:]) for w in text.split()]
            return {"input_ids": torch.tensor([ids])}

    torch.manual_seed(0)
    h = torch.randn(1, 20, 24)
    ids, mask = torch.tensor([[5, 7, 9]]), torch.ones(1, 3, dtype=torch.bool)
    sig = Signals.from_tensors(tokens=torch.randn(1, 20, 16), vit_features=h, instruction_ids=(ids, mask))
    m = vtprune.method("cdpruner", relevance="clip", clip=clip, clip_tokenizer=Tok(), tokenizer=Tok())
    with torch.no_grad():
        got = m.relevance_of(sig)
        v = torch.nn.functional.normalize(clip.visual_projection(clip.vision_model.post_layernorm(h)), dim=-1)
        ctx = torch.zeros(1, 16, dtype=torch.long)
        ctx[0, :3] = ids[0]
        t = clip.get_text_features(input_ids=ctx)
        t = torch.nn.functional.normalize(getattr(t, "pooler_output", t), dim=-1)[0]
    torch.testing.assert_close(got, minmax(-(v[0] @ t)[None], official_clip=True))
    assert m.select(sig, 5).shape == (1, 5)


# --------------------------------------------------------------------------------------------------------- VScan
def test_vscan_schedule_is_the_released_one_at_64():
    from vtprune.methods.vscan import stage_counts

    assert [stage_counts(k, 576, 32, 16) for k in (64, 128, 192)] == [(96, 32), (192, 64), (288, 96)]
    steps = vtprune.method("vscan").expand(32)
    assert [s.name for s in steps] == ["vscan", "vscan_drop"] and steps[1].layer == 16
    assert vtprune.method("vscan").vit_layers_read(24, True) == (6, None)  # CLIP layer 6 (local), feature layer


def test_vscan_stage1_in_a_model_matches_a_reference_fed_the_merged_embeddings():
    """Local scan (top shallow-layer [CLS] attention per window), global scan (feature layer), every other token
    averaged into its most similar kept token in the projected space: the LLM must see exactly those embeddings."""
    from vtprune.testing.reference import masked_forward, pruned_rows

    model = build("llava", "eager")
    inputs = make_inputs(model, ROWS)
    method = vtprune.method("vscan", drop_layer=None, local_layer=2, windows=2)
    with vtprune.prune(model, method, keep=8) as h:
        with torch.no_grad():
            out = model(**inputs).logits
        stats = h.stats
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
        shallow, deep = (att[i][:, :, 0, 1:].mean(1) for i in (1, 0))  # (images, 16): layers 2 and 1 (= -2)
        feats = torch.cat(model.model.get_image_features(inputs["pixel_values"]).pooler_output)
        feats = feats.reshape(len(shallow), 16, -1)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
    merged = embeds.clone()
    for b in range(len(shallow)):
        rc = [(i // 4, i % 4) for i in range(16)]
        local = [max((i for i in range(16) if (rc[i][0] // 2, rc[i][1] // 2) == w), key=lambda i: (shallow[b, i], -i))
                 for w in ((0, 0), (0, 1), (1, 0), (1, 1))]
        rest = sorted((i for i in range(16) if i not in local), key=lambda i: (-deep[b, i], i))
        kept = sorted(local + rest[:4])
        x = feats[b]
        xn = x / x.norm(dim=-1, keepdim=True)
        groups = {i: [x[i]] for i in kept}
        for j in range(16):
            if j not in kept:
                sims = [float(xn[j] @ xn[i]) for i in kept]
                groups[kept[sims.index(max(sims))]].append(x[j])
        pos = (inputs["input_ids"][b] == IMAGE).nonzero()[:, 0]
        for i in kept:
            merged[b, pos[i]] = torch.stack(groups[i]).mean(0)
        assert stats.kept_positions[b][torch.isin(stats.kept_positions[b], pos)].tolist() == pos[kept].tolist()
    ref = masked_forward(model, {"inputs_embeds": merged, "attention_mask": inputs["attention_mask"]}, stats)
    for b, rows in enumerate(pruned_rows(out, stats)):
        kept_pos = stats.kept_positions[b]
        real = inputs["attention_mask"][b, kept_pos].bool()
        torch.testing.assert_close(rows[real], ref[b, kept_pos][real], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- SparseVLM
def test_sparsevlm_stage_counts_are_the_released_lists_plus_clusters():
    from vtprune.methods.sparsevlm import split

    m = vtprune.method("sparsevlm").resolve(32)
    assert m.layers == (3, 7, 16)  # after layers 2, 6, 15
    budget, n, fed = vtprune.budget.Budget(keep=64), 576, []
    for layer in m.layers:
        n = m.keep_count(budget, n, 576, 32, layer)
        fed.append(n)
    assert fed == [82, 32, 18]  # [66, 30, 17] + 16 / 2 / 1 clusters (the reference's own log: 64.8 tokens)
    assert split(576, 82) == (66, 16) and split(82, 32) == (30, 2)
    assert vtprune.method("sparsevlm", recycle=False).resolve(32).keep_count(budget, 576, 576, 32, 3) == 66


def test_sparsevlm_raters_and_dpc_clusters_on_planted_inputs():
    from vtprune.methods.sparsevlm import dpc_knn, raters

    v = torch.zeros(1, 4, 3)
    v[0, :, 0] = 5.0  # every visual token aligns with text token 0
    t = torch.eye(3)[None]
    assert raters(v, t, torch.ones(1, 3, dtype=torch.bool)).tolist() == [[True, False, False]]
    torch.manual_seed(0)
    centres3 = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    x = centres3[torch.arange(30) % 3] + 0.1 * torch.randn(30, 3)
    centres, assign = dpc_knn(x, 3)
    assert sorted((centres % 3).tolist()) == [0, 1, 2]  # one centre per planted cluster
    assert all(int(centres[assign[i]]) % 3 == i % 3 for i in range(30))  # every token joins its own cluster


@dataclass(frozen=True, kw_only=True)
class RowProbe(Method):
    """Keeps the first k candidates and records the per-instruction-token attention rows it is given."""

    name: ClassVar[str] = "row_probe"
    stage: ClassVar[str] = "layer"
    requires: ClassVar[frozenset[str]] = frozenset({"text_attention_rows", "instruction"})
    seen: ClassVar[list] = []

    def select(self, sig, k):
        RowProbe.seen.append((sig.rows, sig.positions, sig.text_attention_rows, sig.instruction[1]))
        return torch.arange(k).expand(sig.num_spans, k)


def test_sparsevlm_text_attention_rows_equal_eager_attention():
    """The per-instruction-token rows of layer K-1 against eager attention maps (which vtprune never requests)."""
    model = build("llava", "eager")
    inputs = make_inputs(model, ROWS)  # left-padded, rows of different lengths
    with vtprune.prune(model, RowProbe(layer=2), ratio=0.5):
        with torch.no_grad():
            model(**inputs)
    rows, positions, got, mask = RowProbe.seen[0]
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[1].mean(1)  # (B, L, L) layer K-1, head mean
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    for s, b in enumerate(rows.tolist()):
        last_img = int((ids[b] == IMAGE).nonzero().max())
        q = [i for i in range(last_img + 1, ids.shape[1]) if am[b, i]]
        torch.testing.assert_close(got[s][: len(q)], att[b][q][:, positions[s]], atol=1e-6, rtol=1e-5)
        assert int(mask[s].sum()) == len(q) and not got[s][len(q):].any()


def test_sparsevlm_first_stage_keeps_the_raters_top_attention():
    model = build("llava", "eager")
    inputs = make_inputs(model, ROWS[:1])
    method = vtprune.method("sparsevlm", layer=(2,), recycle=False)
    with vtprune.prune(model, method, keep=12) as h:  # the last list entry scaled: 17 x 12 / 64 -> 3
        with torch.no_grad():
            model(**inputs)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        att = out.attentions[1].mean(1)[0]  # (L, L)
        emb = model.get_input_embeddings()(inputs["input_ids"])[0]
        img = (inputs["input_ids"][0] == IMAGE).nonzero()[:, 0]
        emb[img] = torch.cat(model.model.get_image_features(inputs["pixel_values"]).pooler_output)
    text = torch.arange(int(img.max()) + 1, inputs["input_ids"].shape[1])
    m = (emb[img] @ emb[text].T).softmax(-1).mean(0)
    rater = text[m > m.mean()]
    score = att[rater][:, img].mean(0)
    k = 3
    expected = img[score.topk(k).indices].sort().values
    kept = h.stats.positions_by_layer[2][0]
    assert torch.equal(kept[torch.isin(kept, img)], expected)


def test_a_methods_own_budget_reaches_the_steps_it_expands_to():
    """vtprune.method("vscan", keep=k) (as lmms-eval model args and sweep configs give it) plans like
    prune(model, "vscan", keep=k): its in-LLM drop step takes the method's budget."""
    from vtprune.testing.tiny import Row, build, make_inputs

    model = build("llava")
    inputs = make_inputs(model, [Row(seed=0)])
    counts = []
    for args, kw in (((vtprune.method("vscan", keep=6),), {}), (("vscan",), {"keep": 6})):
        with vtprune.prune(model, *args, **kw) as h, torch.no_grad():
            model(**inputs)
            counts.append([(s.stage, s.after) for s in h.stats.stages])
    assert counts[0] == counts[1] and len(counts[0]) == 2
