"""Global and local scans with token merging in the vision encoder, then middle-layer pruning in the LLM (VScan).

Paper: "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models" (TMLR 2026),
arXiv:2505.22654. Official code: Tencent/SelfEvolvingAgent @ a82450e, ``VScan/`` (``llava/model/llava_arch.py``
``window_cls_selection`` / ``token_merging`` / ``encode_images``; ``llava/model/modeling_llama_x.py``
``layer_prune``; ``qwen/`` for Qwen2.5-VL).

Stage 1 (before the LLM), T1 tokens per image:

* local scan: each grid is cut into 4 x 4 windows (6 x 6 patches on LLaVA's 24 x 24); each window keeps its
  floor(floor(T1 / 2) / windows) patches of highest [CLS] attention in a shallow ViT layer (``local_layer``: CLIP
  layer 6 of 24, Qwen2.5-VL block 7 of 32 -> hidden-states index depth / 4);
* global scan: the other T1 - local patches of highest [CLS] attention in the feature layer, locals excluded;
* merging: every other token joins the kept token of highest cosine similarity in the projected (LLM input) space
  (ties: the earlier token); a kept token becomes (x_i + sum of its members) / (1 + members).

Stage 2 (``drop_layer``, default L / 2: 16 of 32, Qwen's 14 of 28): at its input the visual tokens are ranked by the
last prompt token's attention computed with that layer's own norm, q / k and RoPE (head mean, softmax over the row);
the top T2 = round(T1 / 3) survive (the released 96 -> 32).

Budget: an average over the L layers, as the paper's rows: ``keep=k`` gives T1 = round(k L / (K + (L - K) / 3)) and
T2 = round(T1 / 3): 64 -> 96 / 32 (the released scripts), 128 -> 192 / 64, 192 -> 288 / 96 (layer 16 of 32).
``drop_layer=None`` runs stage 1 alone with T1 = k.

Differences from the reference:
  * Grids other than 24 x 24 (the reference asserts 576 patches): 4 x 4 windows of near-equal bands; Qwen2.5-VL's
    4 x 4-token windows with per-window caps are not reproduced (the same 4 x 4 window grid instead).
  * Towers without [CLS]: the attention each token receives (query and head mean), as the Qwen port.
  * Stage 2 on Qwen: RoPE and the causal mask apply (the reference's Qwen path drops both); positions: original by
    default (the LLaVA reference renumbers, ``positions="compact"``).
  * LLaVA-NeXT: one per-image selection over base tile and canvas (the reference: T1 per crop, every newline kept,
    and its stage 2 only sees the first T1 tokens of the image block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.methods.base import LayerSpec, Method, ScoreMethod, Selection, check_finite
from vtprune.signals import Signals
from vtprune.registry import METHODS

T2_RATIO = 1 / 3  # the released schedule: 96 -> 32


def stage_counts(k: int, n0: int, num_layers: int, drop_layer: int | None) -> tuple[int, int]:
    """(T1, T2) whose per-layer average over the L layers is k (T2 = round(T1 / 3) from ``drop_layer`` on)."""
    if drop_layer is None:
        return min(k, n0), min(k, n0)
    t1 = min(n0, round(k * num_layers / (drop_layer + (num_layers - drop_layer) * T2_RATIO)))
    return t1, max(1, round(t1 * T2_RATIO))


def window_ids(grid: torch.Tensor, windows: int = 4) -> torch.Tensor:
    """One span: (N,) window id of each candidate, ``windows`` x ``windows`` near-equal bands per grid (group)."""
    group, row, col = grid.unbind(-1)
    out = torch.empty_like(group)
    for g in group.unique().tolist():
        m = group == g
        r, c = row[m] - row[m].min(), col[m] - col[m].min()
        h, w = int(r.max()) + 1, int(c.max()) + 1
        out[m] = g * windows * windows + (r * min(windows, h) // h) * windows + c * min(windows, w) // w
    return out


def merge_into_nearest(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """One span: x (N, D) tokens, kept (k,) ascending. Each other token joins the kept token of highest cosine
    (earliest on ties); returns (k, D) (x_i + sum of members) / (1 + members)."""
    N = x.shape[0]
    is_kept = torch.zeros(N, dtype=torch.bool, device=x.device)
    is_kept[kept] = True
    rest = (~is_kept).nonzero()[:, 0]
    xn = F.normalize(x.float(), dim=-1)
    assign = (xn[rest] @ xn[kept].T).argmax(-1)  # (R,)
    sums = x[kept].float().index_add(0, assign, x[rest].float())
    counts = 1 + torch.bincount(assign, minlength=kept.numel())[:, None]
    return (sums / counts).to(x.dtype)


@METHODS.register("vscan")
@dataclass(frozen=True, kw_only=True)
class VScan(Method):
    """Local (shallow-layer, per window) + global (feature-layer) [CLS] attention scans, merging, then a last-token
    drop at layer L / 2 (its own step, ``vscan_drop``)."""

    name = "vscan"
    stage = "vision"
    layer_ok = False  # stage 1 reads the vision tower; stage 2 is the vscan_drop step
    requires = frozenset({"cls_attention", "tokens", "grid"})

    local_layer: int | None = None  # hidden-states index; None: a quarter of the tower's depth (CLIP: 6)
    vit_layer: int | None = None  # the global scan's layer; None: the feature layer
    drop_layer: int | str | None = "auto"  # stage 2's decoder layer: "auto" = L / 2, None = stage 1 only
    windows: int = 4

    def validate(self) -> None:
        for name in ("local_layer", "vit_layer"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"vscan: {name} must be an int or None, got {v!r}")
        if not (self.drop_layer in (None, "auto") or (isinstance(self.drop_layer, int)
                                                      and not isinstance(self.drop_layer, bool)
                                                      and self.drop_layer >= 1)):
            raise ValueError(f"vscan: drop_layer must be 'auto', None or a decoder layer >= 1, got {self.drop_layer!r}")
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 1:
            raise ValueError(f"vscan: windows must be an integer >= 1, got {self.windows!r}")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        base = self.requires if has_cls else frozenset({"received_attention", "tokens", "grid"})
        return base if self.local_layer is not None else base | {"vit_depth"}

    def vit_layers_read(self, vit_depth: int, has_cls: bool) -> tuple[int | None, ...]:
        return self.shallow_layer(vit_depth), self.vit_layer

    def shallow_layer(self, vit_depth: int) -> int:
        return self.local_layer if self.local_layer is not None else max(1, round(vit_depth / 4))

    def drop_at(self, num_layers: int) -> int | None:
        if self.drop_layer is None:
            return None
        return min(num_layers - 1, max(1, num_layers // 2 if self.drop_layer == "auto" else self.drop_layer))

    def expand(self, num_layers: int) -> list[Method]:
        K = self.drop_at(num_layers)
        if K is None:
            return [self]
        return [self, VScanDrop(layer=K, average=True)]

    def keep_count(self, budget: Budget, n: int, n0: int, num_layers: int, layer: int | None) -> int:
        if budget.is_identity:
            return n
        return min(n, stage_counts(budget.count(n0), n0, num_layers, self.drop_at(num_layers))[0])

    def _attention(self, sig: Signals, vit_layer: int | None) -> torch.Tensor:
        a = sig.cls_attention(vit_layer) if sig.has_cls else sig.received_attention(vit_layer)
        return check_finite(a.float(), owner=self.name)  # (S, N)

    def select(self, sig: Signals, k: int) -> Selection:
        shallow = self._attention(sig, self.local_layer if self.local_layer is not None
                                  else self.shallow_layer(sig.vit_depth))
        deep = self._attention(sig, self.vit_layer)
        x, grid = sig.tokens, sig.grid  # (S, N, D), (S, N, 3)
        S, N = deep.shape
        index, values = [], []
        for s in range(S):
            win = window_ids(grid[s], self.windows)
            ids = win.unique()
            per = (k // 2) // ids.numel()
            taken = torch.zeros(N, dtype=torch.bool, device=deep.device)
            for w in ids.tolist():  # local scan: each window's top shallow-attention tokens
                members = (win == w).nonzero()[:, 0]
                order = torch.sort(shallow[s, members], descending=True, stable=True).indices[:per]
                taken[members[order]] = True
            rest = k - int(taken.sum())  # global scan: the rest by feature-layer attention
            glob = torch.sort(deep[s].masked_fill(taken, float("-inf")), descending=True, stable=True).indices
            taken[glob[:rest]] = True
            kept = taken.nonzero()[:, 0]
            index.append(kept)
            values.append(merge_into_nearest(x[s], kept))
        return Selection(torch.stack(index), torch.stack(values))


@METHODS.register("vscan_drop")
@dataclass(frozen=True, kw_only=True)
class VScanDrop(ScoreMethod):
    """VScan stage 2: at layer K keep the T2 visual tokens the last prompt token attends to most (layer K's own q/k).
    Added by ``vscan`` (its ``drop_layer``); on its own, keep=k keeps k."""

    name = "vscan_drop"
    stage = "layer"
    pre_llm_ok = False
    requires = frozenset({"text_attention"})

    layer: LayerSpec = 16
    average: bool = False  # keep= is VScan's per-layer average (T2 of its schedule), as when vscan adds this step

    def keep_count(self, budget: Budget, n: int, n0: int, num_layers: int, layer: int | None) -> int:
        if not self.average or budget.is_identity:
            return budget.count(n)
        return min(n, stage_counts(budget.count(n0), n0, num_layers, layer)[1])

    def score(self, sig: Signals) -> torch.Tensor:
        return sig.text_attention("last", layer="self")  # (S, N)
