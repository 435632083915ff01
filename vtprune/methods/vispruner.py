"""Important tokens by [CLS] attention plus diverse tokens by similarity-based duplicate removal (VisPruner).

Paper: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs" (ICCV 2025),
arXiv:2412.01818 v2+. Official code: Theia-4869/VisPruner @ aefa01a (``llava/model/llava_arch.py``
``encode_images``; ``clip_encoder.py`` / ``siglip_encoder.py`` for the signals).

For k kept tokens with ``important_ratio`` r (official default 0.5):

1. Important: the int(k r) patches with the highest [CLS] -> patch attention of the ViT feature layer (LLaVA:
   layer -2), head mean over the softmax that includes the [CLS] key (not renormalised).
2. Diverse: the other patches, in descending attention order, are thinned by rounds of bipartite duplicate
   removal on the L2-normalised ViT features of that layer until k - int(k r) remain: the list is split by
   alternating position into A (even) and B (odd); each a in A scores max_b cos(a, b); A is sorted by that
   score (descending) and its first min(8, surplus) are dropped; the next list is the rest of A, in that
   order, followed by B. The order matters: the next round splits it again.

Kept tokens keep their raster order and original positions; [CLS] is never kept nor counted.

Differences from the reference:
  * Ties (equal attention, equal similarity) go to the earlier token (the reference's ``argsort`` is unstable).
  * An odd first list (576 - int(k r) odd) makes the reference fail on a shape mismatch, and a last round that
    would drop more than A holds is undefined there; vtprune drops min(8, surplus, |A|) per round.
  * Towers without [CLS] (SigLIP, Qwen): the attention each patch receives in the feature layer (query and head
    mean); the reference's SigLIP encoder reads the tower's last layer instead of the feature layer.
  * LLaVA-NeXT: one per-image selection over base tile and crops (the reference applies k to each crop and keeps
    every newline); positions: original by default (the reference renumbers, ``positions="compact"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.methods.base import Method, check_finite
from vtprune.signals import Signals
from vtprune.registry import METHODS


def remove_duplicates(x: torch.Tensor, order: torch.Tensor, keep: int, step: int = 8) -> torch.Tensor:
    """VisPruner's rounds of bipartite duplicate removal. x (S, N, Dv) features, order (S, R) candidate
    indices (the list's order matters), keep <= R. Returns (S, keep) surviving indices, in list order."""
    S = x.shape[0]
    xn = F.normalize(x.float(), dim=-1)
    gram = xn @ xn.transpose(1, 2)  # (S, N, N) cosine, computed once; rounds gather sub-blocks
    rows = torch.arange(S, device=x.device)[:, None, None]
    res = order
    while res.shape[1] > keep:
        a, b = res[:, 0::2], res[:, 1::2]  # (S, ceil(R/2)), (S, floor(R/2))
        drop = min(step, res.shape[1] - keep, a.shape[1])
        best = gram[rows, a[:, :, None], b[:, None, :]].amax(-1)  # (S, |A|) max cosine to B
        a = a.gather(1, torch.sort(best, dim=-1, descending=True, stable=True).indices)
        res = torch.cat([a[:, drop:], b], 1)
    return res


@METHODS.register("vispruner")
@dataclass(frozen=True, kw_only=True)
class VisPruner(Method):
    """int(k r) patches by [CLS] attention, the rest by bipartite duplicate removal on ViT features."""

    name = "vispruner"
    stage = "vision"
    requires = frozenset({"cls_attention", "vit_features"})

    important_ratio: float = 0.5
    step: int = 8  # A-tokens dropped per round (the reference's constant)
    vit_layer: int | None = None  # ViT layer of the attention; None = the model's feature layer

    def validate(self) -> None:
        if isinstance(self.important_ratio, bool) or not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio must be in [0, 1], got {self.important_ratio!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"vispruner: step must be an integer >= 1, got {self.step!r}")
        if self.vit_layer is not None and (isinstance(self.vit_layer, bool) or not isinstance(self.vit_layer, int)):
            raise ValueError(f"vispruner: vit_layer must be an int or None, got {self.vit_layer!r}")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        return self.requires if has_cls else frozenset({"received_attention", "vit_features"})

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        att = sig.cls_attention(self.vit_layer) if sig.has_cls else sig.received_attention(self.vit_layer)  # (S, N)
        order = torch.sort(check_finite(att.float(), owner=self.name), dim=-1, descending=True, stable=True).indices
        n_imp = int(k * self.important_ratio)
        important, residual = order[:, :n_imp], order[:, n_imp:]  # (S, n_imp), (S, N - n_imp)
        diverse = remove_duplicates(sig.vit_features, residual, k - n_imp, self.step) if k > n_imp else residual[:, :0]
        return torch.cat([important, diverse], 1).sort(-1).values  # (S, k) raster order
