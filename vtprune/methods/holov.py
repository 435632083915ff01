"""Holistic, spatially balanced budget allocation across crops of the visual sequence (HoloV).

Paper: "HoloV: Holistic Visual Token Pruning" (NeurIPS 2025), arXiv:2510.02912. Official code: obananas/HoloV
@ 1d2e65e (``llava/model/utils.py`` ``HoloV``, called from ``llava_arch.py``; the Qwen2.5-VL port in
``qwen-model-HoloV/``).

A span's N candidates, in raster order, are cut into P contiguous "crops" (N // P tokens each, the first N % P one
more; P = 16 on LLaVA-1.5, so each crop is 1.5 rows of the 24 x 24 grid). Per token i of crop p (n tokens):
a'_i = 1000 a_i with a the [CLS] attention of the ViT feature layer (head mean); on the crop's L2-normalised
projected tokens, S = F F^T with a zero diagonal, mu_i = sum_j S_ij / (n - 1), v_i = sum_j (S_ij - mu_i)^2 / (n - 1);
t_i = a'_i + alpha c v_i with c = mean|a'| / (mean|v| + 1e-6) over the crop, alpha = 0.09. The crop's score is
mean t (mean a of the span for crops of <= 1 token), its weight w_p = s_p / (sum s + 1e-6); it gets floor(w_p k)
tokens, and the k - sum floor(w_p k) left over go one each to the crops of highest weight. A crop keeps its
tokens of highest [CLS] attention. (The variance term is rescaled to the attention term's mean in every crop, so
the allocation is in effect proportional to each crop's mean attention.)

P: ``crops=None`` follows the reference's Qwen2.5-VL rule P = max(1, int(16 N / (9 k))), which is 16 at LLaVA's
576 / 64, the LLaVA code's fixed setting (it has none for other budgets).

Differences from the reference:
  * A crop whose share exceeds its size keeps all its tokens and the excess goes to the other crops in order of
    weight (the reference pads the output with zero vectors, so fewer than k real tokens reach the LLM).
  * Kept tokens keep their raster order and original positions (the reference emits them crop by crop, by
    descending attention inside a crop, renumbered; Qwen keeps that order with original M-RoPE positions).
  * Float32 (the reference scores in float16); ties go to the earlier token / crop.
  * Towers without [CLS]: the attention each token receives (query and head mean), as the Qwen2.5-VL port; its
    scores there are misaligned with the tokens (window order) and its slice is off by one, vtprune's are not.
  * LLaVA-NeXT: the span's base tile and canvas in sequence order, as the reference (which drops the newlines;
    vtprune keeps a newline whose row keeps a token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import Method, check_finite
from vtprune.signals import Signals
from vtprune.registry import METHODS


def crop_bounds(n: int, p: int) -> list[tuple[int, int]]:
    """[start, end) of P contiguous crops of n tokens: n // p each, the first n % p one more."""
    size, extra = divmod(n, p)
    out, start = [], 0
    for i in range(p):
        end = start + size + (i < extra)
        out.append((start, end))
        start = end
    return out


def crop_score(a: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference's score of one crop: attention a (n,), projected tokens x (n, D) -> mean_i t_i."""
    n = a.numel()
    f = x.float() / (x.float().norm(dim=-1, keepdim=True) + 1e-6)
    s = (f @ f.T).fill_diagonal_(0)  # (n, n)
    mu = s.sum(1, keepdim=True) / (n - 1)
    v = (s - mu).pow(2).sum(1) / (n - 1)  # (n,) the zeroed diagonal counts, as in the reference
    a1 = a.float() * 1000
    c = a1.abs().mean() / (v.abs().mean() + 1e-6)
    return (a1 + alpha * c * v).mean()


def allocate(w: torch.Tensor, sizes: list[int], k: int) -> list[int]:
    """floor(w k) per crop, the remainder one each to the highest-weight crops; shares above a crop's size
    flow to the other crops in order of weight (vtprune's rule; the reference zero-pads instead)."""
    share = (w * k).floor().long().tolist()
    order = torch.sort(w, descending=True, stable=True).indices.tolist()
    for j in order[: k - sum(share)]:
        share[j] += 1
    share = [min(s, n) for s, n in zip(share, sizes)]
    for j in order:
        add = min(k - sum(share), sizes[j] - share[j])
        share[j] += max(add, 0)
    return share


@METHODS.register("holov")
@dataclass(frozen=True, kw_only=True)
class HoloV(Method):
    """Crop budgets by crop attention (+ similarity variance), [CLS]-attention top-k inside each crop."""

    name = "holov"
    stage = "vision"
    requires = frozenset({"cls_attention", "tokens"})

    crops: int | None = None
    alpha: float = 0.09
    vit_layer: int | None = None

    def validate(self) -> None:
        if self.crops is not None and (isinstance(self.crops, bool) or not isinstance(self.crops, int)
                                       or self.crops < 1):
            raise ValueError(f"holov: crops must be an integer >= 1 or None, got {self.crops!r}")
        if isinstance(self.alpha, bool) or not self.alpha >= 0:
            raise ValueError(f"holov: alpha must be >= 0, got {self.alpha!r}")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        return self.requires if has_cls else frozenset({"received_attention", "tokens"})

    def num_crops(self, n: int, k: int) -> int:
        return min(n, self.crops if self.crops is not None else max(1, int((1024 / 576) * n / k)))

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        a = sig.cls_attention(self.vit_layer) if sig.has_cls else sig.received_attention(self.vit_layer)
        a = check_finite(a.float(), owner=self.name)  # (S, N)
        x = sig.tokens  # (S, N, D)
        S, N = a.shape
        bounds = crop_bounds(N, self.num_crops(N, k))
        out = []
        for s in range(S):
            scores = torch.stack([crop_score(a[s, i:j], x[s, i:j], self.alpha) if j - i > 1 else a[s].mean()
                                  for i, j in bounds])  # (P,)
            share = allocate(scores / (scores.sum() + 1e-6), [j - i for i, j in bounds], k)
            keep = [i + torch.sort(a[s, i:j], descending=True, stable=True).indices[:m]
                    for (i, j), m in zip(bounds, share) if m]
            out.append(torch.cat(keep).sort().values)
        return torch.stack(out)  # (S, k) raster order
