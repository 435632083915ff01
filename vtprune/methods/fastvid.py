"""FastVID: cut a video where its frames change, keep each frame's salient tokens, and merge the rest of each segment
into a few dense context tokens on anchor frames.

Paper: Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025,
arXiv 2503.11187. Official code: LunarShen/FastVID (commit a40a109; ``fastvid_llavavideo`` / ``fastvid_llavaonevision``
``modeling_qwen2.py``, ``modeling_qwen2_5_vl.py``), pruning at the LLM input of LLaVA-OneVision / LLaVA-Video /
Qwen2.5-VL.

On a whole video of T frames of n tokens, r = 1 - ratio:
  1. DySeg: frame features g_t (the mean of the frame's tokens); cut after the c - 1 lowest cos(g_t, g_t+1) and after
     every one below tau (c = 8, tau = 0.9).
  2. Every frame keeps R = int(n r) tokens: S = R - int(R d) salient ones, the top by the attention its patches
     receive in the vision tower (kept unchanged), and C = int(R d) context tokens per frame, pooled per segment
     (d = 0.4).
  3. A segment of L frames has ceil(L / p) anchor frames, its last and every p-th before it (p = 4), which share its
     C L context tokens; an anchor's context tokens are its non-salient tokens of highest DPC-kNN score (k = 4,
     distances in the LLM embedding space). Every non-salient token of the segment that is not one of the anchor's
     own context tokens joins its most cosine-similar one, which becomes beta * itself + (1 - beta) * the mean of
     its members (beta = 0.6; a token with no member stays itself).
Kept: exactly T R tokens, in sequence order at their original positions (as the reference); an image passes whole.

Differences from the reference:
  * Saliency and frame features without SigLIP's attention-pooling head, which the HF LLaVA-OneVision / LLaVA-Video
    checkpoints do not carry: saliency is the attention a token's patches receive in the vision tower's feature
    layer (query and head mean; the authors' own recipe for towers without the head, their Qwen2.5-VL port), and a
    frame's feature is the mean of its LLM input tokens (their Qwen2.5-VL choice) where the OneVision code uses the
    head's pooled output.
  * The count is exact (T R): the context tokens of a segment are split over its anchors with the remainder going to
    the latest anchors (the LLaVA-Video code; the OneVision code drops the remainder). An anchor short of
    non-salient tokens passes the rest on as extra salient tokens of the segment's frames, latest first.
  * The merge sources exclude the anchor's own context tokens (the LLaVA-Video code; the OneVision code lets a
    context token join itself). Ties: the earlier token (the reference adds random noise). R is at least 1.
  * Qwen2.5-VL's ``DySeg_ignore`` (runs of near-identical temporal patches collapsed onto their last) is not done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.methods.base import Method, Selection, topk_stable
from vtprune.methods.evs import video_frames
from vtprune.methods.sparsevlm import density_peaks
from vtprune.registry import METHODS
from vtprune.signals import Signals


def segments(g: torch.Tensor, c: int, tau: float) -> list[tuple[int, int]]:
    """DySeg on frame features g (T, D): [(first, last)] frames of each segment."""
    T = g.shape[0]
    if T < 2:
        return [(0, T - 1)]
    sim = F.cosine_similarity(g[:-1].float(), g[1:].float(), dim=-1)  # (T-1,) consecutive frames
    cuts = set(topk_stable(-sim, min(c - 1, T - 1)).tolist()) | set((sim < tau).nonzero()[:, 0].tolist())
    bounds = [-1, *sorted(cuts), T - 1]
    return [(a + 1, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def per_frame(budget: Budget, n: int) -> int:
    """R, the tokens each frame of n keeps."""
    return max(1, min(n, budget.keep) if budget.ratio is None else int(n * (1 - budget.ratio)))


@METHODS.register("fastvid")
@dataclass(frozen=True, kw_only=True)
class FastVID(Method):
    """FastVID: dynamic segments, salient tokens per frame, density-picked context tokens merged per segment."""

    name = "fastvid"
    stage = "input"
    span = "video"
    requires = frozenset({"tokens", "frame", "received_attention"})

    c: int = 8  # DySeg_c: at least this many segments
    tau: float = 0.9  # DySeg_tau: also cut below this frame similarity
    d: float = 0.4  # STPrune_d: the context share of a frame's budget
    p: int = 4  # DTM_p: an anchor frame every p frames of a segment
    beta: float = 0.6  # DTM_beta: the context token's own weight in its merge
    k_density: int = 4  # DPC-kNN neighbours
    vit_layer: int | None = None  # where saliency is read (None: the feature layer)

    def validate(self) -> None:
        for name in ("c", "p", "k_density"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"fastvid: {name} must be an integer >= 1, got {v!r}")
        for name in ("d", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"fastvid: {name} must be in [0, 1], got {getattr(self, name)!r}")

    def video_count(self, budget: Budget, n: int, frames: int) -> int:
        if budget.is_identity or frames < 2:  # a video method: images pass whole, as in the reference
            return n
        return frames * per_frame(budget, n // frames)

    def select(self, sig: Signals, k: int) -> Selection:
        x, frame, att = sig.tokens, sig.frame, sig.received_attention(self.vit_layer)  # (S, N, D), (S, N), (S, N)
        index, values = [], []
        for s in range(x.shape[0]):
            T = video_frames(frame[s])
            n = x.shape[1] // T
            R = k // T
            i, v = self._video(x[s].view(T, n, -1), att[s].float().view(T, n), R)
            index.append(i)
            values.append(v)
        return Selection(torch.stack(index), torch.stack(values))

    def _video(self, x: torch.Tensor, att: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One video x (T, n, D), saliency att (T, n), R kept per frame: (kept flat indices (T R,), values)."""
        T, n, D = x.shape
        C = int(R * self.d)
        S = R - C
        salient = torch.zeros(T, n, dtype=torch.bool, device=x.device)
        for t in range(T):
            salient[t, topk_stable(att[t], S, owner=self.name)] = True
        out = x.clone()
        context = torch.zeros_like(salient)
        for a, b in segments(x.mean(1), self.c, self.tau):
            L = b - a + 1
            anchors = list(range(b, a - 1, -self.p))  # the last frame, then every p-th before it
            share, extra = divmod(C * L, len(anchors))
            spill = 0
            for j, t in enumerate(anchors):
                want = share + (j < extra) + spill
                free = (~salient[t]).nonzero()[:, 0]  # (m,) this anchor's non-salient tokens
                got = min(want, free.numel())
                spill = want - got
                if got == 0:
                    continue
                _, score = density_peaks(x[t, free], self.k_density)
                mine = free[torch.sort(score, descending=True, stable=True).indices[:got]]
                context[t, mine] = True
                self._merge(x, out, a, b, salient, t, mine)
            for t in range(b, a - 1, -1):  # context no anchor could hold: more salient tokens, latest frames first
                rest = (~salient[t] & ~context[t]).nonzero()[:, 0]
                take = min(spill, rest.numel())
                if take:
                    salient[t, rest[topk_stable(att[t, rest], take, owner=self.name)]] = True
                    spill -= take
        keep = (salient | context).view(-1).nonzero()[:, 0]
        return keep, out.view(T * n, D)[keep]

    def _merge(self, x: torch.Tensor, out: torch.Tensor, a: int, b: int, salient: torch.Tensor, t: int,
               mine: torch.Tensor) -> None:
        """Merge the segment's non-salient tokens (but the anchor's own context tokens) into them: out[t, mine]."""
        src_mask = ~salient[a:b + 1].clone()  # (L, n)
        src_mask[t - a, mine] = False
        src = x[a:b + 1][src_mask]  # (M, D)
        ctx = x[t, mine]  # (c, D)
        if src.shape[0] == 0:
            return
        assign = (F.normalize(src.float(), dim=-1) @ F.normalize(ctx.float(), dim=-1).T).argmax(-1)  # (M,)
        count = torch.bincount(assign, minlength=ctx.shape[0])[:, None]  # (c, 1)
        total = torch.zeros(ctx.shape, dtype=torch.float32, device=x.device).index_add_(0, assign, src.float())
        w = torch.clamp(1.0 / (count + 1), min=self.beta)  # (c, 1) the context token's own weight
        merged = torch.where(count > 0, w * ctx.float() + (1 - w) * total / count.clamp(min=1), ctx.float())
        out[t, mine] = merged.to(out.dtype)
