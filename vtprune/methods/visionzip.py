"""Dominant tokens by [CLS] attention plus merged contextual tokens (VisionZip).

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025),
arXiv:2412.04467. Official code: dvlab-research/VisionZip (``visionzip/utils.py``, ``clip_encoder.py``).

In the ViT feature layer (LLaVA: CLIP layer -2): D dominant patches by [CLS] attention (head sum; the
ranking equals the head mean), the [CLS] token itself, and C contextual tokens: among the remaining R
patches, C targets at a uniform stride (step = max(1, R // C)), every other remaining patch assigned to
its most similar target by the cosine of head-mean keys, and each contextual token = target + mean of its
members — the reference's quirk (not the mean of the group). The merged ViT features are projected.
Budget: ``keep=64`` = 53 dominant + [CLS] + 10 contextual (the paper's 54 + 10 counts [CLS] as dominant);
C = round(keep * 10 / 64) unless ``contextual`` is given, D = keep - C - 1.

Differences from the reference:
  * vtprune cannot insert a token: the [CLS] feature (projected) rides in the first span slot that holds
    neither a dominant nor a contextual token, and contextual tokens sit at their target's slot, so
    exactly ``keep`` tokens enter the LLM, at original positions (the reference emits [CLS], dominants,
    then contextual tokens, re-indexed; ``positions="compact"`` differs from it only in that order).
  * Towers without [CLS] (SigLIP, Qwen): dominants by the attention patches receive (as the paper's SigLIP
    variant), no [CLS] token, D = keep - C.
  * LLaVA-NeXT: one per-image selection over base tile and canvas (the reference applies the budget to
    every crop and drops the newlines); [CLS] of the span's first tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.methods.base import Method, Selection, topk_stable
from vtprune.signals import Signals
from vtprune.registry import METHODS


def contextual_merge(h: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor,
                     c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One span: h (N, Dv) features, keys (N, dk) head-mean keys, rest (R,) indices not dominant (ascending).
    Returns (targets (c,), merged (c, Dv)) with merged = h[target] + mean(h[members])."""
    R = rest.numel()
    step = max(1, R // c)
    targets = rest[torch.arange(0, R, step, device=rest.device)[:c]]  # (c,)
    is_target = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
    is_target[targets] = True
    members = rest[~is_target[rest]]  # (R - c,)
    kn = F.normalize(keys.float(), dim=-1)
    assign = (kn[members] @ kn[targets].T).argmax(-1)  # (R - c,) first index on ties
    sums = torch.zeros(c, h.shape[-1], dtype=torch.float32, device=h.device).index_add_(0, assign, h[members].float())
    counts = torch.bincount(assign, minlength=c).clamp(min=1)[:, None]
    return targets, (h[targets].float() + sums / counts).to(h.dtype)


@METHODS.register("visionzip")
@dataclass(frozen=True, kw_only=True)
class VisionZip(Method):
    """VisionZip: dominant patches by [CLS] attention, [CLS] itself, merged contextual tokens."""

    name = "visionzip"
    stage = "vision"
    requires = frozenset({"vit_features", "vit_keys", "projector", "cls_attention", "vit_cls"})

    contextual: int | None = None
    vit_layer: int | None = None

    def validate(self) -> None:
        if self.contextual is not None and (isinstance(self.contextual, bool) or not isinstance(self.contextual, int)
                                            or self.contextual < 0):
            raise ValueError(f"visionzip: contextual must be an integer >= 0 or None, got {self.contextual!r}")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        if has_cls:
            return self.requires
        return frozenset({"vit_features", "vit_keys", "projector", "received_attention"})

    def split(self, k: int, has_cls: bool) -> tuple[int, int]:
        """(dominant patches D, contextual C) for k kept tokens."""
        c = round(k * 10 / 64) if self.contextual is None else self.contextual
        c = min(c, max(k - 1 - int(has_cls), 0))
        return k - c - int(has_cls), c

    def select(self, sig: Signals, k: int) -> Selection:
        has_cls = sig.has_cls
        h = sig.vit_features  # (S, N, Dfeat)
        # [CLS] can ride only where projector inputs are ViT tokens (not InternVL's pixel-shuffled 2x2 blocks)
        carry_cls = has_cls and sig.vit_cls(self.vit_layer).shape[-1] == h.shape[-1]
        d, c = self.split(k, carry_cls)
        scores = sig.cls_attention(self.vit_layer) if has_cls else sig.received_attention(self.vit_layer)
        keys = sig.vit_keys(self.vit_layer, heads=True).mean(2)  # (S, N, dk) head-mean keys
        project = sig.projector
        S, N, _ = h.shape
        index, values = [], []
        dominant = topk_stable(scores, d, owner=self.name) if d else torch.empty(S, 0, dtype=torch.long)
        for s in range(S):
            dom = dominant[s].sort().values
            taken = torch.zeros(N, dtype=torch.bool, device=h.device)
            taken[dom] = True
            rest = (~taken).nonzero()[:, 0]
            slots, feats = [dom], [h[s, dom]]
            if c:
                targets, merged = contextual_merge(h[s], keys[s], rest, c)
                taken[targets] = True
                slots.append(targets)
                feats.append(merged)
            if carry_cls:  # [CLS] rides in the first free slot of the span
                free = (~taken).nonzero()[:, 0][:1]
                slots.append(free)
                feats.append(sig.vit_cls(self.vit_layer)[s, :1])
            index.append(torch.cat(slots))
            values.append(project(torch.cat(feats)[None])[0])
        return Selection(torch.stack(index), torch.stack(values))
