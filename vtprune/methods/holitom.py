"""HoliTom: merge what stays still over time (segments found by a global dynamic programme), prune what moves by
attention, then halve the video inside the LLM by merging each dropped token into its most similar kept one.

Paper: Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", NeurIPS 2025,
arXiv 2505.21334. Official code: cokeshao/HoliTom (commit e9b2972; ``holitom/llava_arch.py`` outside the LLM,
``holitom/modeling_qwen2.py`` inside), on LLaVA-OneVision / LLaVA-Video.

Outside the LLM, on a whole video of T frames of n tokens (r = 1 - ratio, the retention):
  1. s[t, p] = cos(x[t, p], x[t + 1, p]); a window [a, b] of frames could store its cells similar (> tau = 0.8) in
     every consecutive pair once instead of b - a + 1 times; a dynamic programme picks the segments saving most (ties:
     a frame alone, then the shortest window).
  2. r' = min(r T n / (T n - saved), 1). In a segment, a still cell is averaged over the segment's frames and the
     still cells are clustered by DPC-kNN (k = 7) into round(n_s r') tokens, each 0.6 * its centre + 0.4 * the mean
     of its members, standing at the centre's cell of the segment's first frame; every frame keeps its ceil(n_d r')
     moving cells the vision tower attends to most (received attention), unchanged.
Inside the LLM (``holitom_merge`` at ``merge_layer``, 18 of 28 scaled to depth; ``merge_layer=None``: outside only):
the video keeps the round((1 - m) v) of its v tokens the last prompt token attends to most at the layer before
(m = 0.5), and each other token is averaged into the kept one most cosine-similar to it, pairwise in sequence order
(the reference's loop: the last member weighs 1/2).

Differences from the reference:
  * The count is exact: a video keeps vtprune's budget count of its tokens (``ratio`` = 1 - RETAIN_RATIO). The
    reference's ceil / round per frame and segment miss it by a few tokens; vtprune trims or adds moving tokens by
    attention (over the whole video) to land on it, then fewer (or more) still clusters, and when a mostly still
    video has no cell left to cluster, still cells of a segment's later frames, unmerged, by attention.
  * Saliency: the vision tower's received attention of its feature layer (the reference: SigLIP's last layer,
    computed with eager attention; vtprune recomputes it from q/k).
  * In the LLM: scored by the last prompt token's attention recomputed from layer K-1's q/k (the reference asks that
    layer for its full eager attention map), over the video's candidates (the reference's span also holds the
    newline); merged values are written in the hidden states at original positions. Batch rows beyond the first are
    pruned too (the reference prunes row 0 only).
  * Ties: the earlier token (the reference adds random noise to DPC densities). An image passes whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.methods.base import LayerSpec, Method, Selection, scale_layers, topk_stable
from vtprune.methods.evs import video_frames
from vtprune.methods.sparsevlm import density_peaks
from vtprune.registry import METHODS
from vtprune.signals import Signals

MERGE_LAYER, REF_DEPTH = 18, 28  # HOLITOM_k on LLaVA-OneVision-7B's 28-layer Qwen2


def still_counts(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """(T, T) long: saved[a, b] = (cells similar in every consecutive pair of frames a..b) * (b - a); sim (T-1, n)."""
    T = sim.shape[0] + 1
    saved = torch.zeros(T, T, dtype=torch.long)
    for a in range(T - 1):
        still = torch.ones(sim.shape[1], dtype=torch.bool, device=sim.device)
        for b in range(a + 1, T):
            still &= sim[b - 1] > tau
            saved[a, b] = int(still.sum()) * (b - a)
    return saved


def holistic_segments(saved: torch.Tensor) -> tuple[list[tuple[int, int]], int]:
    """The segments maximising the tokens saved (a frame alone wins ties, then the shortest window), and the total."""
    T = saved.shape[0]
    best, start = [0] * (T + 1), [0] * T  # best[i]: the most saved over frames 0..i-1
    for i in range(T):
        best[i + 1], start[i] = best[i], i
        for w in range(2, i + 2):
            a = i - w + 1
            if best[a] + int(saved[a, i]) > best[i + 1]:
                best[i + 1], start[i] = best[a] + int(saved[a, i]), a
    segs, i = [], T - 1
    while i >= 0:
        segs.append((start[i], i))
        i = start[i] - 1
    return segs[::-1], best[T]


def cluster_merge(x: torch.Tensor, c: int, k: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of x (m, D) into c tokens: (centres (c,) ascending, values (c, D) = beta centre + (1 - beta) mean of its
    members, the centre alone when it has none)."""
    dist, score = density_peaks(x, k)
    centres = torch.sort(score, descending=True, stable=True).indices[:c].sort().values
    assign = dist[:, centres].argmin(-1)  # (m,)
    member = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    member[centres] = False
    count = torch.bincount(assign[member], minlength=c)[:, None]  # (c, 1)
    total = torch.zeros(c, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, assign[member],
                                                                                        x[member].float())
    own = x[centres].float()
    values = torch.where(count > 0, beta * own + (1 - beta) * total / count.clamp(min=1), own)
    return centres, values


@METHODS.register("holitom")
@dataclass(frozen=True, kw_only=True)
class HoliTom(Method):
    """HoliTom: holistic temporal segments, still cells merged per segment, moving cells pruned by attention, then
    ``holitom_merge`` inside the LLM."""

    name = "holitom"
    stage = "input"
    span = "video"
    requires = frozenset({"tokens", "frame", "received_attention"})

    tau: float = 0.8  # T: a cell is still when consecutive frames are more similar than this (0.65 at 10% in the paper)
    beta: float = 0.6  # BETA: a cluster's centre weight
    k_density: int = 7  # K: DPC-kNN neighbours
    merge_layer: int | str | None = "auto"  # HOLITOM_k: "auto" = 18 of 28 scaled; None: outside the LLM only
    merge_ratio: float = 0.5  # HOLITOM_r: the share of the video merged away at merge_layer
    vit_layer: int | None = None  # where saliency is read (None: the feature layer)

    def validate(self) -> None:
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.merge_ratio < 1.0:
            raise ValueError(f"holitom: beta must be in [0, 1] and merge_ratio in [0, 1), got {self.beta!r}, "
                             f"{self.merge_ratio!r}")
        K = self.merge_layer
        if K not in ("auto", None) and (isinstance(K, bool) or not isinstance(K, int) or K < 1):
            raise ValueError(f"holitom: merge_layer must be 'auto', None or a decoder layer >= 1, "
                             f"got {self.merge_layer!r}")

    def expand(self, num_layers: int) -> list[Method]:
        if self.merge_layer is None:
            return [self]
        K = scale_layers((MERGE_LAYER,), num_layers, REF_DEPTH)[0] if self.merge_layer == "auto" else self.merge_layer
        return [self, HoliTomMerge(layer=min(num_layers - 1, max(1, K)), merge_ratio=self.merge_ratio)]

    def video_count(self, budget: Budget, n: int, frames: int) -> int:
        return n if frames < 2 else budget.count(n)

    def select(self, sig: Signals, k: int) -> Selection:
        x, frame, att = sig.tokens, sig.frame, sig.received_attention(self.vit_layer)  # (S, N, D), (S, N), (S, N)
        index, values = [], []
        for s in range(x.shape[0]):
            T = video_frames(frame[s])
            i, v = self._video(x[s].view(T, -1, x.shape[-1]), att[s].float().view(T, -1), k)
            index.append(i)
            values.append(v)
        return Selection(torch.stack(index), torch.stack(values))

    def _video(self, x: torch.Tensor, att: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        T, n, D = x.shape
        sim = F.cosine_similarity(x[:-1].float(), x[1:].float(), dim=-1)  # (T-1, n) same cell, next frame
        segs, saved = holistic_segments(still_counts(sim, self.tau))
        r = min(k / (T * n - saved), 1.0)  # r' = r T n / (T n - saved), with r T n = k
        out = x.clone()
        keep = torch.zeros(T, n, dtype=torch.bool, device=x.device)
        moving = torch.zeros_like(keep)  # candidates for the count's adjustment
        still_of: list[tuple[int, torch.Tensor, int]] = []  # (first frame, still cells, clusters)
        for a, b in segs:
            still = (sim[a:b] > self.tau).all(0) if b > a else torch.zeros(n, dtype=torch.bool, device=x.device)
            cells = still.nonzero()[:, 0]
            if cells.numel():
                still_of.append((a, cells, round(cells.numel() * r)))
            for t in range(a, b + 1):
                moving[t] = ~still
                free = (~still).nonzero()[:, 0]
                m = math.ceil(free.numel() * r)
                if m:
                    keep[t, free[topk_stable(att[t, free], m, owner=self.name)]] = True
        # land exactly on k: moving tokens by attention over the video, then (if still short of room) fewer clusters
        planned = int(keep.sum()) + sum(c for _, _, c in still_of)
        flat_att, flat_keep, flat_moving = att.reshape(-1), keep.view(-1), moving.view(-1)
        if planned > k:
            kept = flat_keep.nonzero()[:, 0]
            drop = kept[topk_stable(-flat_att[kept], min(planned - k, kept.numel()), owner=self.name)]
            flat_keep[drop] = False
            planned -= drop.numel()
        elif planned < k:
            free = (flat_moving & ~flat_keep).nonzero()[:, 0]
            add = free[topk_stable(flat_att[free], min(k - planned, free.numel()), owner=self.name)]
            flat_keep[add] = True
            planned += add.numel()
        for j in sorted(range(len(still_of)), key=lambda j: -still_of[j][2]):  # rarely: more or fewer clusters
            a, cells, c = still_of[j]
            c2 = min(cells.numel(), max(0, c - (planned - k)))
            planned += c2 - c
            still_of[j] = (a, cells, c2)
        if planned < k:  # every cell of every first frame is in (a mostly still video): still cells of later frames
            later = torch.zeros_like(keep)
            for a, cells, _ in still_of:
                b = next(e for s_, e in segs if s_ == a)
                later[a + 1 : b + 1, cells] = True
            free = later.view(-1).nonzero()[:, 0]
            add = free[topk_stable(flat_att[free], min(k - planned, free.numel()), owner=self.name)]
            flat_keep[add] = True  # as themselves: their cell's cluster stands in the first frame
            planned += add.numel()
        for a, cells, c in still_of:
            if c == 0:
                continue
            b = next(e for s_, e in segs if s_ == a)
            centres, merged = cluster_merge(x[a:b + 1, cells].float().mean(0), c, self.k_density, self.beta)
            keep[a, cells[centres]] = True
            out[a, cells[centres]] = merged.to(out.dtype)
        flat = keep.view(-1).nonzero()[:, 0]
        return flat, out.view(T * n, D)[flat]


@METHODS.register("holitom_merge")
@dataclass(frozen=True, kw_only=True)
class HoliTomMerge(Method):
    """HoliTom inside the LLM: a video keeps round((1 - m) v) of its v tokens by the last prompt token's attention at
    the layer before; each other token is averaged into its most similar kept one, pairwise in sequence order.
    Added by ``holitom`` (its ``merge_layer``); images pass whole."""

    name = "holitom_merge"
    stage = "layer"
    span = "video"
    pre_llm_ok = False
    scored_at_previous_layer = True
    requires = frozenset({"text_attention", "tokens"})

    layer: LayerSpec = MERGE_LAYER
    merge_ratio: float = 0.5

    def video_count(self, budget: Budget, n: int, frames: int) -> int:
        return n if budget.is_identity or frames < 2 else round(n * (1 - self.merge_ratio))

    def select(self, sig: Signals, k: int) -> Selection:
        att, h = sig.text_attention("last"), sig.tokens  # (S, N), (S, N, D) the layer's input
        index, values = [], []
        for s in range(h.shape[0]):
            kept = topk_stable(att[s].float(), k, owner=self.name).sort().values  # (k,)
            is_kept = torch.zeros(h.shape[1], dtype=torch.bool, device=h.device)
            is_kept[kept] = True
            hn = F.normalize(h[s].float(), dim=-1)
            dropped = (~is_kept).nonzero()[:, 0]  # ascending: the reference's loop order
            target = (hn[dropped] @ hn[kept].T).argmax(-1)  # (n - k,) the most similar kept token
            v = h[s, kept].float().clone()
            for j, t in zip(dropped.tolist(), target.tolist()):  # h_t <- (h_t + h_j) / 2, in order
                v[t] = (v[t] + h[s, j].float()) / 2
            index.append(kept)
            values.append(v.to(h.dtype))
        return Selection(torch.stack(index), torch.stack(values))
