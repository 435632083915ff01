"""Video pruners (EVS, VidCom2) on planted videos and inside the model: a whole video per span, vLLM's counts, the
frames and tokens the papers' rules pick. Equality with vLLM's own functions: tests/vllm_host/test_video_prune.py."""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune.budget import Budget
from vtprune.methods.evs import evs_scores
from vtprune.methods.vidcom2 import gaussian_similarity, vidcom2_keep
from vtprune.signals import Signals
from vtprune.testing.tiny import Row, build, make_inputs


def video_signals(x: torch.Tensor, T: int, h: int, w: int, ratio: float | None = None) -> Signals:
    """One video span: x (T*h*w, D) in raster order."""
    n = T * h * w
    j = torch.arange(n)
    frame = j // (h * w)
    grid = torch.stack([frame, (j % (h * w)) // w, j % w], 1)
    return Signals.from_tensors(tokens=x[None], grid=grid[None], frame=frame[None],
                                budget=Budget(ratio=ratio) if ratio is not None else None)


@pytest.mark.parametrize("ratio,n,T,evs,vidcom2", [
    (0.7, 196 * 16, 16, 940, 940),  # int(), not round(): 940.8 -> 940 (vtprune's round keeps 941)
    (0.9, 64 * 8, 8, 64, 51),  # EVS keeps at least one frame
    (0.1, 64 * 8, 8, 460, 460),
    (0.9, 100, 1, 100, 9),  # 1 - 0.9 is 0.0999...: 9, not 10
    (0.99, 4 * 8, 8, 4, 8),  # VidCom2: at least a token per frame
])
def test_counts_are_vllms(ratio, n, T, evs, vidcom2):
    b = Budget(ratio=ratio)
    assert vtprune.method("evs").video_count(b, n, T) == evs
    assert vtprune.method("vidcom2").video_count(b, n, T) == vidcom2


def test_evs_keeps_the_first_frame_and_the_changed_patches():
    T, h, w, D = 4, 3, 5, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(h * w, D, generator=g).repeat(T, 1)  # (T*h*w, D) a still video ...
    moved = [(1, 7), (2, 3), (2, 11), (3, 0)]  # ... but for these (frame, patch) pairs
    for t, p in moved:
        x[t * h * w + p] = torch.randn(D, generator=g)
    # a patch that changes differs from its previous frame, and so does the frame after it (it changes back)
    changed = {(t, p) for t, p in moved} | {(t + 1, p) for t, p in moved if t + 1 < T}
    k = h * w + len(changed)
    keep = vtprune.method("evs").select(video_signals(x, T, h, w), k)[0]
    assert keep.tolist() == sorted(set(range(h * w)) | {t * h * w + p for t, p in changed})


def test_evs_breaks_ties_towards_the_earlier_token():
    T, h, w, D = 3, 2, 2, 4
    x = torch.eye(D).repeat(T, 1)  # one-hot patches repeated exactly: every later token scores exactly 0
    keep = vtprune.method("evs").select(video_signals(x, T, h, w), 6)[0]
    assert keep.tolist() == [0, 1, 2, 3, 4, 5]  # frame 0, then frame 1 in raster order


def test_evs_scores_are_one_minus_cosine_to_the_previous_frame():
    T, h, w, D = 3, 2, 3, 5
    x = torch.randn(T * h * w, D, dtype=torch.float64)
    s = evs_scores(x, T, h, w).view(T, h * w)
    v = x.view(T, h * w, D)
    cos = (v[1:] * v[:-1]).sum(-1) / (v[1:].norm(dim=-1) * v[:-1].norm(dim=-1))
    assert torch.all(s[0] == 255)
    torch.testing.assert_close(s[1:], 1 - cos)


def _vidcom2_reference(x: torch.Tensor, T: int, base: float, target: int) -> set[int]:
    """The paper's rule written out token by token in float64 (no ties on random input)."""
    n, D = x.shape
    tpf = n // T
    x = x.double()
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    low = sorted(range(D), key=lambda c: float(var[c]))[: max(1, int(D * 0.5))]
    z = x[:, low]
    z = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)
    frames = [z[t * tpf:(t + 1) * tpf] for t in range(T)]
    vid_c = z.mean(0)

    def g(u: torch.Tensor, c: torch.Tensor) -> float:
        d2 = float(((u - c) ** 2).sum())
        return sum(math.exp(-d2 / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))

    v = [[g(u, vid_c) for u in f] for f in frames]
    f = [[g(u, fr.mean(0)) for u in fr] for fr in frames]
    score = [-sum(row) / tpf for row in v]
    e = [math.exp((s - max(score)) / 0.01) for s in score]
    p = [a / sum(e) for a in e]
    ks = [min(tpf, max(1, round(tpf * min(1.0, base * (1 + pt - sum(p) / T))))) for pt in p]
    sim = {t * tpf + i: v[t][i] + f[t][i] for t in range(T) for i in range(tpf)}
    kept = set()
    for t, k in enumerate(ks):
        kept |= set(sorted(range(t * tpf, (t + 1) * tpf), key=lambda j: sim[j])[:k])
    if len(kept) > target:
        kept -= set(sorted(kept, key=lambda j: -sim[j])[: len(kept) - target])
    else:
        kept |= set(sorted(set(sim) - kept, key=lambda j: sim[j])[: target - len(kept)])
    return kept


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T,ratio", [(4, 0.75), (6, 0.5), (1, 0.8), (3, 0.9)])
def test_vidcom2_equals_the_rule_written_out(seed, T, ratio):
    g = torch.Generator().manual_seed(seed)
    h, w, D = 3, 4, 10
    x = torch.randn(T * h * w, D, generator=g, dtype=torch.float64)
    x[: h * w] += 3 * torch.randn(D, generator=g, dtype=torch.float64)  # a frame unlike the rest
    method = vtprune.method("vidcom2")
    k = method.video_count(Budget(ratio=ratio), T * h * w, T)
    keep = method.select(video_signals(x, T, h, w, ratio), k)[0]
    assert set(keep.tolist()) == _vidcom2_reference(x, T, 1 - ratio, k)


def test_vidcom2_gives_the_distinct_frame_more():
    g = torch.Generator().manual_seed(1)
    T, tpf, D = 4, 20, 16
    x = torch.randn(tpf, D, generator=g).repeat(T, 1) + 0.05 * torch.randn(T * tpf, D, generator=g)
    x[2 * tpf:3 * tpf] = torch.randn(tpf, D, generator=g)  # frame 2 is new
    keep = vidcom2_keep(x, T, base=0.25, target=20)
    per_frame = keep.view(T, tpf).sum(1).tolist()
    assert sum(per_frame) == 20 and per_frame[2] == max(per_frame) and per_frame[2] > 5


def test_gaussian_similarity_sums_the_bandwidths():
    x, c = torch.randn(2, 3, 4), torch.randn(1, 1, 4)
    d2 = ((x - c) ** 2).sum(-1)
    want = sum(torch.exp(-d2 / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))
    torch.testing.assert_close(gaussian_similarity(x, c), want)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "llava_next_video"])
@pytest.mark.parametrize("name", ["evs", "vidcom2"])
def test_a_video_is_one_span_whatever_the_budget_says(family, name):
    """The engine hands the method the whole video (vLLM's unit), counts it with the method's rule, and the
    kept tokens are the method's choice on the video's LLM input embeddings."""
    model = build(family)
    inputs = make_inputs(model, [Row(before=3, after=2, seed=4, image_size=(56, 28), video_frames=4)])
    captured = {}

    def grab(module, args, kwargs):  # the LLM input of the unpruned model: what the method scores
        captured.setdefault("embeds", kwargs["inputs_embeds"].clone())

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    with vtprune.prune(model, name, ratio=0.7, budget="per_frame") as h, torch.no_grad():
        model(**inputs)
        stats, lay = h.stats, h.stats.layout
    video = lay.cand[0] & (lay.frame[0] >= 0) & (lay.image[0] == lay.image[0][lay.cand[0]].max())
    pos = video.nonzero()[:, 0]
    T = int(lay.frame[0][pos].unique().numel())
    assert T > 1
    (span,) = [s for s in stats.stages[0].spans if s.n == pos.numel()]  # one span: the video
    k = vtprune.method(name).video_count(Budget(ratio=0.7), pos.numel(), T)
    assert span.kept == span.budget == k
    x = captured["embeds"][0, pos]
    grid = lay.grid[0][pos]
    sig = Signals.from_tensors(tokens=x[None], grid=grid[None], frame=lay.frame[0][pos][None], budget=Budget(ratio=0.7))
    want = pos[vtprune.method(name).select(sig, k)[0]]
    kept = set(stats.kept_positions[0].tolist())
    assert {p for p in pos.tolist() if p in kept} == set(want.tolist())


def test_evs_keeps_images_whole_and_vidcom2_prunes_them():
    model = build("llava")
    inputs = make_inputs(model, [Row(seed=0)])
    for name, whole in (("evs", True), ("vidcom2", False)):
        with vtprune.prune(model, name, ratio=0.5) as h, torch.no_grad():
            model(**inputs)
            assert (h.stats.visual_after == h.stats.visual_before) == whole


# ----------------------------------------------------------------------------------------------------- DyCoke
def test_dycoke_frames_whole_and_pruned_as_the_reference_loops():
    from vtprune.methods.dycoke import ttm_references

    refs = ttm_references(32)
    assert [t for t, r in enumerate(refs) if r is None] == [0, 4, 8, 12, 16, 20, 24, 28, 30]  # the F-4 bound
    assert refs[1] == 0 and refs[2] == 0 and refs[3] == 2 and refs[31] == 30
    # 9 whole frames of 196 + 23 frames keeping int(0.3 * 196) = 58: 49.4% of 6272, as the research notes count
    assert vtprune.method("dycoke").video_count(Budget(ratio=0.7), 32 * 196, 32) == 9 * 196 + 23 * 58
    assert ttm_references(5) == [None, 0, 0, 2, None]  # an odd count: the last frame stays whole


def test_dycoke_keeps_the_cells_that_changed_against_the_reference_frame():
    T, per, D = 6, 10, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(per, D, generator=g).repeat(T, 1) + 1e-3 * torch.randn(T * per, D, generator=g)
    changed = {1: [2, 7], 2: [0, 9], 3: [4, 5], 5: [1, 3]}  # frame -> cells unlike its reference frame
    for t, cells in changed.items():
        for c in cells:
            x[t * per + c] = torch.randn(D, generator=g)
    for c in changed[2]:  # frame 3 is compared with frame 2: it carries frame 2's changes, so only its own differ
        x[3 * per + c] = x[2 * per + c]
    method = vtprune.method("dycoke", drop_layer=None)
    budget = Budget(ratio=0.75)  # int(0.25 * 10) = 2 per pruned frame
    k = method.video_count(budget, T * per, T)
    assert k == 2 * per + 4 * 2  # frames 0 and 4 whole (ttm_references(6) = [None, 0, 0, 2, None, 4])
    frame = (torch.arange(T * per) // per)[None]
    keep = method.select(Signals.from_tensors(tokens=x[None], frame=frame, budget=budget), k)[0].tolist()
    expect = set(range(per)) | set(range(4 * per, 5 * per)) | {t * per + c for t, cs in changed.items() for c in cs}
    assert set(keep) == expect and keep == sorted(keep)


def test_dycoke_stage_two_is_the_last_prompt_tokens_attention_over_the_video():
    """dycoke_drop at layer K keeps the video's int(0.2 m) tokens FastV at K (per_image: the video as one span) would
    keep at that count; images pass whole."""
    model = build("qwen2_vl")
    inputs = make_inputs(model, [Row(before=3, after=2, seed=4, image_size=(56, 28), video_frames=8)])
    with vtprune.prune(model, vtprune.method("dycoke", drop_layer=2), ratio=0.5) as h, torch.no_grad():
        model(**inputs)
        stats = h.stats
    (img, vid) = stats.stages[1].spans
    assert img.kept == img.n and vid.kept == int((1 - 0.8) * vid.n)  # the reference's int((1 - p) m)
    drop = vtprune.method("fastv", layer=2, keep=vid.kept)
    with vtprune.prune(model, [vtprune.method("dycoke", drop_layer=None), drop], ratio=0.5,
                       budget="per_image") as h2, torch.no_grad():
        model(**inputs)
    lay = stats.layout
    video = set(((lay.image[0] == lay.image[0].max()) & lay.cand[0]).nonzero()[:, 0].tolist())
    at2 = set(stats.positions_at(2)[0].tolist()) & video
    assert len(at2) == vid.kept and at2 == set(h2.stats.positions_at(2)[0].tolist()) & video


# ----------------------------------------------------------------------------------------------------- FastVID
def test_fastvid_cuts_at_the_lowest_frame_similarities_and_below_tau():
    from vtprune.methods.fastvid import segments

    g = torch.eye(6)[[0, 0, 1, 1, 1, 2]].float() + 0.01  # scene changes after frames 1 and 4
    assert segments(g, c=3, tau=0.5) == [(0, 1), (2, 4), (5, 5)]
    assert segments(g, c=1, tau=0.5) == [(0, 1), (2, 4), (5, 5)]  # every cut below tau
    assert segments(g, c=1, tau=-1.0) == [(0, 5)]  # c = 1 and nothing below tau: one segment
    assert segments(g[:1], c=8, tau=0.9) == [(0, 0)]


def test_fastvid_keeps_salient_tokens_and_merges_context_as_the_paper():
    """One segment of 3 frames (one anchor, the last): each frame keeps its S most salient tokens unchanged; the
    anchor's C * 3 densest non-salient tokens carry 0.6 * themselves + 0.4 * the mean of the segment's non-salient
    tokens nearest to them (cosine)."""
    from vtprune.methods.sparsevlm import density_peaks

    T, n, D = 3, 20, 6
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, D, generator=g)
    x = base.repeat(T, 1) + 0.01 * torch.randn(T * n, D, generator=g)  # one scene: one segment
    att = torch.rand(T * n, generator=g)
    method = vtprune.method("fastvid", c=1)
    budget = Budget(ratio=0.5)  # R = 10: S = 6 salient, C = 4 context per frame
    k = method.video_count(budget, T * n, T)
    frame = (torch.arange(T * n) // n)[None]
    sel = method.select(Signals.from_tensors(tokens=x[None], frame=frame, received_attention=att[None],
                                             budget=budget), k)
    index, values = sel.index[0], sel.values[0]
    assert k == T * 10 and index.tolist() == sorted(index.tolist())
    salient = [set((att[t * n:(t + 1) * n].argsort(descending=True)[:6] + t * n).tolist()) for t in range(T)]
    free = [i for i in range(2 * n, 3 * n) if i not in salient[2]]
    _, score = density_peaks(x[free], 4)
    context = {free[j] for j in score.argsort(descending=True)[:12].tolist()}
    assert set(index.tolist()) == set().union(*salient) | context
    sources = [i for i in range(T * n) if i not in set().union(*salient) and i not in context]
    ctx = sorted(context)
    sim = torch.nn.functional.normalize(x[sources], dim=-1) @ torch.nn.functional.normalize(x[ctx], dim=-1).T
    owner = sim.argmax(-1)
    for j, c in enumerate(ctx):
        members = [sources[i] for i in (owner == j).nonzero()[:, 0].tolist()]
        want = x[c] if not members else 0.6 * x[c] + 0.4 * x[members].mean(0)
        got = values[index.tolist().index(c)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for i in set().union(*salient):  # salient tokens unchanged
        torch.testing.assert_close(values[index.tolist().index(i)], x[i])


def test_fastvid_counts_exactly_and_passes_images_whole():
    method = vtprune.method("fastvid")
    assert method.video_count(Budget(ratio=0.9), 32 * 196, 32) == 32 * 19  # the paper's 19 of 196 at r = 10%
    assert method.video_count(Budget(ratio=0.9), 196, 1) == 196
    model = build("llava_onevision")
    inputs = make_inputs(model, [Row(before=3, after=2, seed=4, image_size=(56, 28), video_frames=8)])
    with vtprune.prune(model, "fastvid", ratio=0.5) as h, torch.no_grad():
        model(**inputs)
    (img, vid) = h.stats.stages[0].spans
    assert img.kept == img.n and vid.kept == vid.budget == 8 * int(vid.n // 8 * 0.5)


# ----------------------------------------------------------------------------------------------------- HoliTom
def test_holitom_segments_maximise_the_tokens_saved():
    from vtprune.methods.holitom import holistic_segments, still_counts

    # 5 frames of 4 cells: frames 0-2 share cells 0-2, frames 3-4 share every cell; 2 -> 3 is a cut
    sim = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])  # (T-1, n)
    saved = still_counts(sim, 0.8)
    assert saved[0, 2] == 3 * 2 and saved[3, 4] == 4 and saved[0, 1] == 3 and saved[1, 3] == 0
    segs, total = holistic_segments(saved)
    assert segs == [(0, 2), (3, 4)] and total == 10
    assert holistic_segments(still_counts(torch.zeros(3, 4), 0.8)) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0)


def test_holitom_merges_still_cells_over_time_and_clusters_them():
    """A video whose cells 0..5 never move and cells 6..11 change every frame: one segment; the still cells are
    averaged over the frames, clustered, and stand in the first frame; moving cells are kept by attention."""
    from vtprune.methods.holitom import cluster_merge

    T, n, D = 3, 12, 8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, n, D, generator=g)
    x[1:, :6] = x[0, :6] + 1e-4 * torch.randn(T - 1, 6, D, generator=g)  # still cells
    att = torch.rand(T, n, generator=g)
    method = vtprune.method("holitom", merge_layer=None)
    k = 12  # of 36
    frame = (torch.arange(T * n) // n)[None]
    sel = method.select(Signals.from_tensors(tokens=x.reshape(1, T * n, D), frame=frame,
                                             received_attention=att.reshape(1, -1), budget=Budget(keep=k)), k)
    index, values = sel.index[0].tolist(), sel.values[0]
    # saved = 6 still cells x 2 = 12: r' = 12 / (36 - 12) = 0.5 -> round(6 * 0.5) = 3 clusters and ceil(6 * 0.5) = 3
    # moving cells per frame: 3 + 3 * 3 = 12 = k
    centres, merged = cluster_merge(x[:, :6].mean(0), 3, 7, 0.6)
    assert [i for i in index if i < n and i < 6] == centres.tolist()
    for c, v in zip(centres.tolist(), merged):
        torch.testing.assert_close(values[index.index(c)], v)
    for t in range(T):
        moving = [i - t * n for i in index if t * n + 6 <= i < (t + 1) * n]
        assert sorted(moving) == sorted((att[t, 6:].argsort(descending=True)[:3] + 6).tolist())
    assert len(index) == k


def test_holitom_counts_exactly_on_a_still_video():
    """Found by the synthetic video model (one object, 129 still cells of 144): a video whose every cell stays still
    can hold at most n clusters in its first frame; a budget beyond that keeps still cells of later frames, unmerged,
    by attention, so the count stays exact."""
    T, n, D = 4, 16, 8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, n, D, generator=g).expand(T, n, D) + 1e-4 * torch.randn(T, n, D, generator=g)
    x[:, 0] = torch.randn(T, D, generator=g)  # one moving cell
    att = torch.rand(T, n, generator=g)
    frame = (torch.arange(T * n) // n)[None]
    k = 30  # of 64: 15 still clusters + 4 moving cells = 19 at most without later frames
    sel = vtprune.method("holitom", merge_layer=None).select(
        Signals.from_tensors(tokens=x.reshape(1, T * n, D), frame=frame, received_attention=att.reshape(1, -1),
                             budget=Budget(keep=k)), k)
    index = sel.index[0]
    assert index.numel() == k == index.unique().numel()
    later = sorted(i for i in index.tolist() if i >= n and i % n)  # still cells beyond the first frame
    expect = (att[1:, 1:].reshape(-1).argsort(descending=True, stable=True)[: k - n - (T - 1)])  # 15 + 1 in frame 0
    assert later == sorted(((expect // (n - 1) + 1) * n + expect % (n - 1) + 1).tolist())
    for i in later:  # unmerged: the token itself
        torch.testing.assert_close(sel.values[0][index.tolist().index(i)], x.reshape(T * n, D)[i])


def test_holitom_merge_inside_the_llm_is_the_pairwise_loop():
    """Each dropped token folds into its most similar kept token in sequence order: h <- (h + h_j) / 2."""
    from vtprune.methods.holitom import HoliTomMerge

    S, N, D = 1, 6, 4
    g = torch.Generator().manual_seed(2)
    h = torch.randn(S, N, D, generator=g)
    att = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.02, 0.03]])
    sel = HoliTomMerge(layer=2).select(Signals.from_tensors(stage="layer", layer=2, tokens=h, text_attention=att), 2)
    assert sel.index[0].tolist() == [1, 3]
    hn = torch.nn.functional.normalize(h[0], dim=-1)
    want = {1: h[0, 1].clone(), 3: h[0, 3].clone()}
    for j in (0, 2, 4, 5):
        t = 1 if float(hn[j] @ hn[1]) >= float(hn[j] @ hn[3]) else 3
        want[t] = (want[t] + h[0, j]) / 2
    torch.testing.assert_close(sel.values[0], torch.stack([want[1], want[3]]))


def test_fastvid_context_an_anchor_cannot_hold_becomes_salient_tokens():
    T, n, D = 4, 4, 5
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, D, generator=g).repeat(T, 1) + 0.01 * torch.randn(T * n, D, generator=g)  # one segment
    att = torch.rand(T * n, generator=g)
    method = vtprune.method("fastvid", c=1)
    budget = Budget(ratio=0.1)  # R = 3 per frame: S = 2, C = 1; 4 context tokens, one anchor with 2 free tokens
    k = method.video_count(budget, T * n, T)
    sel = method.select(Signals.from_tensors(tokens=x[None], frame=(torch.arange(T * n) // n)[None],
                                             received_attention=att[None], budget=budget), k)
    assert k == 12 and len(set(sel.index[0].tolist())) == 12
