"""Hierarchical attention in the vision encoder: anchor, buffer and register tokens (HiPrune).

Paper: "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision Encoders",
arXiv:2508.00553. Official code: Danielement321/HiPrune @ 6e83a12 (``LLaVA/llava/model/llava_arch.py``
``encode_images``; ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` for Qwen2.5-VL).

Scores: the attention each patch receives in a ViT layer, mean over heads and over all queries ([CLS]'s
included, the [CLS] key dropped, not renormalised). For k kept tokens:

1. Anchors: the round(k alpha / 5) patches (Python's round, half to even; alpha = 0.1) with the highest score
   in the object layer (``object_layer``: hidden-states index 9 of CLIP's 24 = the reference's
   ``HIPRUNE_OBJECT_LAYER=9``; 16 on Qwen2.5-VL's 32 blocks; ``object_layer=None`` picks these by depth).
2. Buffers: each anchor's neighbours at flat raster offsets -1, +1, -W, +W within its grid (W the grid's width),
   clamped to the grid, so a border anchor's left / right neighbour wraps to the adjacent row and a top / bottom
   one repeats a corner, as the reference's flat indices do; anchors and buffers are deduplicated.
3. Registers: the remaining k - |anchors u buffers| patches with the highest score in the deep layer (the
   feature layer: LLaVA's -2; the last block on Qwen), anchors and buffers excluded.

Kept tokens keep their raster order and original positions.

Differences from the reference:
  * Ties go to the earlier token (the reference's ``topk`` leaves them unspecified).
  * Qwen2.5-VL: the reference's exclusion of anchors / buffers from the registers subtracts 1 from query *sums*
    (about 1 per token), so a token can be picked twice and fewer than k kept; vtprune excludes them (exactly
    k). Its scores under FlashAttention are recomputed over the whole image ignoring window attention;
    vtprune's received attention follows each block's own attention (window or full).
  * LLaVA-NeXT: one per-image selection over base tile and crops with k for the image (the reference splits k
    evenly over crops and forces the ``spatial`` layout without unpadding / newlines); buffers stay within each
    grid (base tile, canvas, frame).
  * ``object_layer`` for towers the reference has no setting for: 3/8 of the depth with [CLS], half without
    (its CLIP-L and Qwen2.5-VL settings as fractions).
  * Positions: original by default; the reference renumbers on LLaVA (``positions="compact"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import Method, check_finite
from vtprune.signals import Signals
from vtprune.registry import METHODS


def flat_neighbours(grid: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """One span: grid (N, 3) (group, row, col) of the candidates, anchors (a,) candidate indices. Returns the
    (a, 4) candidate indices at flat raster offsets -1, +1, -W, +W of each anchor within its group (W the
    group's width, flat index clamped to the group's cells), -1 where that cell holds no candidate."""
    group, row, col = grid.unbind(-1)  # (N,) each
    out = torch.full((anchors.numel(), 4), -1, dtype=torch.long, device=grid.device)
    for i, a in enumerate(anchors.tolist()):
        same = (group == group[a]).nonzero()[:, 0]  # candidates of the anchor's grid
        r0, c0 = row[same].min(), col[same].min()
        h, w = int(row[same].max() - r0) + 1, int(col[same].max() - c0) + 1
        cells = torch.full((h * w,), -1, dtype=torch.long, device=grid.device)
        cells[(row[same] - r0) * w + (col[same] - c0)] = same
        f = int((row[a] - r0) * w + (col[a] - c0))
        out[i] = cells[torch.tensor([f - 1, f + 1, f - w, f + w], device=grid.device).clamp(0, h * w - 1)]
    return out


def anchor_count(k: int, alpha: float) -> int:
    """round(k alpha / 5), half to even (Python's round, as the reference)."""
    return round(k * alpha / 5)


@METHODS.register("hiprune")
@dataclass(frozen=True, kw_only=True)
class HiPrune(Method):
    """Anchors (object-layer attention) + their 4 neighbours + registers (deep-layer attention)."""

    name = "hiprune"
    stage = "vision"
    requires = frozenset({"received_attention", "grid"})

    alpha: float = 0.1
    # hidden-states index of the anchor layer; None: 3/8 of the tower's depth with [CLS] (CLIP-L: 9, the reference's
    # LLaVA setting), half without (Qwen2.5-VL: 16, the reference's Qwen setting)
    object_layer: int | None = None
    deep_layer: int | None = None  # None: the model's feature layer

    def validate(self) -> None:
        if isinstance(self.alpha, bool) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"hiprune: alpha must be in [0, 1], got {self.alpha!r}")
        for field in ("object_layer", "deep_layer"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"hiprune: {field} must be an int or None, got {v!r}")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        return self.requires if self.object_layer is not None else self.requires | {"vit_depth"}

    def anchor_layer(self, vit_depth: int, has_cls: bool) -> int:
        if self.object_layer is not None:
            return self.object_layer
        return max(1, round(vit_depth * 3 / 8)) if has_cls else max(1, vit_depth // 2)

    def vit_layers_read(self, vit_depth: int, has_cls: bool) -> tuple[int | None, ...]:
        return self.anchor_layer(vit_depth, has_cls), self.deep_layer

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        layer = self.object_layer if self.object_layer is not None else self.anchor_layer(sig.vit_depth, sig.has_cls)
        obj = check_finite(sig.received_attention(layer).float(), owner=self.name)  # (S, N)
        deep = check_finite(sig.received_attention(self.deep_layer).float(), owner=self.name)  # (S, N)
        S, N = obj.shape
        n_anchor = min(anchor_count(k, self.alpha), k)
        anchors = torch.sort(obj, dim=-1, descending=True, stable=True).indices[:, :n_anchor]  # (S, a)
        grid = sig.grid if n_anchor else None
        out = []
        for s in range(S):
            taken = torch.zeros(N, dtype=torch.bool, device=obj.device)
            taken[anchors[s]] = True
            room = k - n_anchor  # buffers beyond k (tiny budgets) are dropped, best anchors' first
            for b in flat_neighbours(grid[s], anchors[s]).reshape(-1).tolist() if n_anchor else ():
                if room and b >= 0 and not taken[b]:
                    taken[b], room = True, room - 1
            rest = k - int(taken.sum())
            registers = torch.sort(deep[s].masked_fill(taken, float("-inf")), descending=True, stable=True).indices
            taken[registers[:rest]] = True
            out.append(taken.nonzero()[:, 0])
        return torch.stack(out)  # (S, k) raster order
