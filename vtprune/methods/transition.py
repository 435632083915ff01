"""Token transition variation plus instruction-guided attention, pruned progressively (TransPrune).

Paper: "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model" (CVPR 2026),
arXiv:2507.20630. Official code: liaolea/TransPrune (``modeling_llama_transprune.py``).

Token transition variation (TTV): in each accumulation layer, for the attention and the MLP sub-layer,
x_in = its RMSNorm output and x_out = its output before the residual add; TTV = |x_out| / |x_in| * n with
n = softmax over the row's tokens of (1 - cos(x_in, x_out)); the layer's TTV = attention + MLP terms.
Instruction-guided attention (IGA): at a pruning layer K, the attention of the text after the image to
each image token, recomputed from layer K's own q/k (head and query mean). Score = TTV accumulated over
the accumulation layers below K (normalised over the span) + IGA (normalised): the paper's
alpha * TTV + (1 - alpha) * IGA with alpha = 0.5. Defaults for 32 layers: accumulate on layers 6..11,
prune at the input of layers 7, 9, 12 keeping 87.5% / 62.5% / 12.5% of the ORIGINAL image tokens
(576 -> 504 -> 360 -> 72). Other depths: layers scaled by L / 32 (rounded), fractions unchanged.

Budget: ``keep=k`` (or a ratio) sets the last stage's count; earlier fractions are scaled by the same
factor, capped at 1. The reference re-indexes positions (``positions="compact"`` reproduces that).

Differences from the reference:
  * Direction term 1 - cos as the official code (``direction="abs"``: 1 - |cos|, as the paper writes).
  * The TTV softmax runs per row over its non-padding tokens (the reference: batch 1, whole sequence).
  * GQA keys are repeated per head (the reference assumes multi-head attention).
  * The paper's "High" / "Low" settings are not identifiable in the released scripts; the scripts'
    schedule is the default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vtprune.budget import Budget
from vtprune.methods.base import LayerSpec, ScoreMethod, scale_layers
from vtprune.signals import Signals
from vtprune.registry import METHODS

REF_LAYERS, REF_FRACTIONS, REF_DEPTH = (7, 9, 12), (0.875, 0.625, 0.125), 32


def token_transition(x_in: torch.Tensor, x_out: torch.Tensor, attend: torch.Tensor) -> dict[str, torch.Tensor]:
    """TTV of one sub-layer for every token: x_in (B, L, D) its normed input, x_out (B, L, D) its output before
    the residual add, attend (B, L) bool the row's real tokens. Returns (B, L) per direction term: ``"cos"``
    (1 - cos, the official code) and ``"abs"`` (1 - |cos|, the paper): |x_out| / |x_in| * softmax_row(term)."""
    x_in, x_out = x_in.float(), x_out.float()
    magnitude = x_out.norm(dim=-1) / x_in.norm(dim=-1).clamp(min=1e-12)  # (B, L)
    cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)  # (B, L)
    return {name: magnitude * term.masked_fill(~attend, float("-inf")).softmax(-1)
            for name, term in (("cos", 1 - cos), ("abs", 1 - cos.abs()))}


@METHODS.register("transition", aliases=("transprune",))
@dataclass(frozen=True, kw_only=True)
class TransPrune(ScoreMethod):
    """TransPrune: TTV over the accumulation layers + IGA at each pruning layer, progressive."""

    name = "transition"
    stage = "layer"
    pre_llm_ok = False
    requires = frozenset({"transition", "text_attention"})
    reference_layers = REF_LAYERS

    layer: LayerSpec = None  # None: (7, 9, 12) scaled to the model's depth
    fractions: tuple[float, ...] = REF_FRACTIONS  # kept share of the ORIGINAL image tokens per stage
    accumulate: tuple[int, ...] | None = None  # None: 6 .. last pruning layer - 1, scaled
    direction: str = "cos"

    def validate(self) -> None:
        if self.direction not in ("cos", "abs"):
            raise ValueError(f"transition: direction={self.direction!r}; allowed: 'cos', 'abs'")
        fr = tuple(self.fractions)
        if not fr or any(not 0 < f <= 1 for f in fr) or list(fr) != sorted(fr, reverse=True):
            raise ValueError(f"transition: fractions must be non-increasing in (0, 1], got {self.fractions!r}")
        if self.layer is not None and len(self.layers) != len(fr):
            raise ValueError(f"transition: {len(self.layers)} layers but {len(fr)} fractions ({self.fractions!r})")

    def resolve(self, num_layers: int) -> TransPrune:
        layers = self.layers
        fractions = tuple(self.fractions)
        if self.layer is None:  # scale the reference schedule; merge stages that land on one layer
            scaled = scale_layers(REF_LAYERS, num_layers, REF_DEPTH)
            merged: dict[int, float] = {}
            for p, f in zip(scaled, REF_FRACTIONS):
                merged[p] = f  # the later (smaller) fraction wins
            layers, fractions = tuple(merged), tuple(merged.values())
        accumulate = self.accumulate
        if accumulate is None:
            first = min(max(0, int(6 * num_layers / REF_DEPTH + 0.5)), layers[0] - 1)
            accumulate = tuple(range(first, layers[-1]))
        return replace(self, layer=layers, fractions=fractions, accumulate=tuple(accumulate))

    def transition_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(self.accumulate or ())

    @staticmethod
    def sublayer_statistic(x_in: torch.Tensor, x_out: torch.Tensor, attend: torch.Tensor) -> dict[str, torch.Tensor]:
        return token_transition(x_in, x_out, attend)

    def keep_count(self, budget: Budget, n: int, n0: int, num_layers: int, layer: int | None) -> int:
        if budget.is_identity:
            return n
        stage = self.layers.index(layer)
        scale = budget.count(n0) / max(self.fractions[-1] * n0, 1e-9)  # the last stage keeps the budget
        return max(1, int(n0 * min(1.0, self.fractions[stage] * scale) + 1e-6))

    def score(self, sig: Signals) -> torch.Tensor:
        ttv = sig.transition(self.direction)  # (S, N)
        iga = sig.text_attention("instruction", layer="self")  # (S, N)
        ttv = ttv / (ttv.sum(-1, keepdim=True) + 1e-8)
        iga = iga / (iga.sum(-1, keepdim=True) + 1e-8)
        return ttv + iga
