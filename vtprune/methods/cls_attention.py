"""[CLS]-attention pruning (FasterVLM): keep the patches the vision tower's [CLS] token attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster" (Zhang et al.), arXiv:2412.01818 v1. Official code: Theia-4869/FasterVLM.

Score of visual token j: softmax(q_cls . K^T / sqrt(d))[j] in the ViT layer whose output the model
takes as image features (LLaVA's ``vision_feature_layer=-2``: CLIP layer 22 of 24), averaged over
heads; the top-k patches survive. The selection happens before the LLM; tokens keep their original
positions.

Differences from the reference:
  * The [CLS] row is recomputed from that ViT layer's q/k projections, so the vision tower stays on
    sdpa; the official code asks CLIP for its attention maps, which forces eager attention.
  * LLaVA-NeXT: the official code keeps the same T tokens in every AnyRes crop, then unpads; vtprune
    ranks all crops of an image jointly under one per-image budget (scores are comparable: each crop's
    [CLS] row sums to one), so exactly the budgeted count survives. ``image_newline`` tokens follow
    vtprune's AnyRes rule (kept iff their row keeps a token) instead of all being kept.
  * Towers without a [CLS] token (SigLIP in LLaVA-OneVision, the Qwen ViTs): with the default
    ``no_cls="received_attention"`` the score is the attention each token's patch(es) receive in that
    layer, averaged over the image's queries and heads (VisionZip's choice for SigLIP; FasterVLM itself
    defines no such case); ``no_cls="error"`` refuses these towers at ``prune()`` time instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import ScoreMethod
from vtprune.signals import Signals
from vtprune.registry import METHODS


@METHODS.register("cls_attention", aliases=("fastervlm",))
@dataclass(frozen=True, kw_only=True)
class ClsAttention(ScoreMethod):
    """Top-k patches by [CLS] attention (head mean) of the ViT feature layer."""

    name = "cls_attention"
    stage = "vision"
    requires = frozenset({"cls_attention"})

    # ViT layer (hidden-states index, as in ``vision_feature_layer``) whose [CLS] row scores the
    # patches; None = the model's own ``vision_feature_layer`` (FasterVLM's choice).
    vit_layer: int | None = None
    # towers without [CLS]: "received_attention" (mean attention received) or "error"
    no_cls: str = "received_attention"

    def validate(self) -> None:
        if self.vit_layer is not None and (isinstance(self.vit_layer, bool) or not isinstance(self.vit_layer, int)):
            raise ValueError(f"cls_attention: vit_layer must be an int or None, got {self.vit_layer!r}")
        if self.no_cls not in ("received_attention", "error"):
            raise ValueError(f"cls_attention: no_cls={self.no_cls!r}; allowed: 'received_attention', 'error'")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        if not has_cls and self.no_cls == "received_attention":
            return frozenset({"received_attention"})
        return self.requires

    def score(self, sig: Signals) -> torch.Tensor:
        if sig.has_cls:
            return sig.cls_attention(vit_layer=self.vit_layer)  # (S, N)
        return sig.received_attention(vit_layer=self.vit_layer)  # (S, N)
