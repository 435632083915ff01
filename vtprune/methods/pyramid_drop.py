"""Stage-wise visual token dropping over the LLM's depth, ranked by the last instruction token (PyramidDrop).

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction"
(CVPR 2025), arXiv:2410.17247. Official code: Cooperx521/PyramidDrop @ 6444f30
(``llava/model/language_model/modeling_llama_pdrop.py``, ``pdrop_rank_drop``; schedules in ``scripts/``).

At the input of each stage layer b_i the visual tokens are ranked by the attention of the last prompt token,
recomputed with layer b_i's own norm, q / k projections and RoPE on its input (the reference applies the next
layer's projections to the previous layer's output), softmax over every key of the row (text included), mean over
heads; the top int(n0 lam^i) of the ORIGINAL n0 image tokens survive (kept order).

Budget: the paper's token rows are average visual tokens per layer over all L layers (layers before b_1 see all
n0). ``keep=k`` (or a ratio) is that average: lam is solved (continuous average, rounded to 4 decimals) so that
(b_1 + sum_i (b_{i+1} - b_i) lam^i + (L - b_m) lam^m) n0 / L = k. Default schedule ``layer=(2, 8, 16)`` (scaled by
L / 32), the author's recipe for the 192 / 128 / 64 comparison rows (issue #29; lam 0.560 / 0.420 / 0.192 on 576
tokens); the released scripts' schedule is ``layer=(8, 16, 24)`` with lam = 0.5, i.e. ``keep=270``
(576 -> 288 -> 144 -> 72), or ``lam=0.5`` given directly (the schedule then ignores the budget, as the reference).
``budget_mode="last"``: ``keep=k`` is the last stage's count instead (lam = (k / n0)^(1 / stages)), for models too
shallow for an average of k.

Differences from the reference:
  * ``keep`` is the average per layer and lam solved from it; the reference takes lam and the layers directly
    (its 192 / 128 / 64 settings were never released).
  * Original positions by default (the reference renumbers after every drop, ``positions="compact"``).
  * The last prompt token is each row's last non-padding token (the reference: batch 1); ties to the earlier token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.budget import Budget
from vtprune.methods.base import LayerSpec, ScoreMethod
from vtprune.signals import Signals
from vtprune.registry import METHODS

REF_LAYERS = (2, 8, 16)  # for a 32-layer LLM


def average_tokens(lam: float, layers: tuple[int, ...], num_layers: int, n0: int) -> float:
    """Visual tokens per decoder layer, averaged over all layers, for the schedule n0 lam^i from layer b_i."""
    bounds = (*layers, num_layers)
    total = layers[0] + sum((bounds[i + 1] - bounds[i]) * lam ** (i + 1) for i in range(len(layers)))
    return n0 * total / num_layers


def solve_lam(avg: float, layers: tuple[int, ...], num_layers: int, n0: int) -> float:
    """lam in [0, 1] whose schedule averages ``avg`` tokens per layer (bisection; rounded to 4 decimals)."""
    if avg >= n0:
        return 1.0
    floor = average_tokens(0.0, layers, num_layers, n0)
    if avg < floor:
        raise ValueError(f"pdrop: an average of {avg} visual tokens per layer is below what layers {layers} allow "
                         f"({floor:.1f}: the first {layers[0]} of {num_layers} layers see all {n0}); "
                         "give an earlier first layer, e.g. layer=(1, 8, 16), or a larger budget")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average_tokens(mid, layers, num_layers, n0) < avg else (lo, mid)
    return round((lo + hi) / 2, 4)


@METHODS.register("pdrop", aliases=("pyramiddrop", "pyramid_drop"))
@dataclass(frozen=True, kw_only=True)
class PyramidDrop(ScoreMethod):
    """Last-token attention at each stage layer (its own q/k), n0 lam^i tokens from stage i on."""

    name = "pdrop"
    stage = "layer"
    pre_llm_ok = False
    requires = frozenset({"text_attention"})
    reference_layers = REF_LAYERS

    layer: LayerSpec = None  # None: (2, 8, 16) scaled to the model's depth
    lam: float | None = None  # None: solved from the budget (an average per layer); a value: the reference's
    #                           fixed ratio, which then sets the schedule on its own (the budget is not used)
    budget_mode: str = "average"  # "average": keep= is the per-layer average; "last": the last stage keeps it

    def validate(self) -> None:
        if self.budget_mode not in ("average", "last"):
            raise ValueError(f"pdrop: budget_mode={self.budget_mode!r}; allowed: 'average', 'last'")
        if self.lam is not None and (isinstance(self.lam, bool) or not 0.0 < self.lam <= 1.0):
            raise ValueError(f"pdrop: lam must be in (0, 1] or None, got {self.lam!r}")
        if self.layer is not None and 0 in self.layers:
            raise ValueError(f"pdrop: layer 0 would drop before the LLM sees any token; got layer={self.layer!r}")

    def keep_count(self, budget: Budget, n: int, n0: int, num_layers: int, layer: int | None) -> int:
        if self.lam is None and budget.is_identity:
            return n
        if self.lam is not None:
            lam = self.lam
        elif self.budget_mode == "last":  # n0 lam^m = k
            lam = (budget.count(n0) / n0) ** (1 / len(self.layers)) + 1e-9
        else:
            lam = solve_lam(budget.count(n0), self.layers, num_layers, n0)
        stage = self.layers.index(layer)
        return min(n, max(1, int(n0 * lam ** (stage + 1) + 1e-6)))

    def score(self, sig: Signals) -> torch.Tensor:
        return sig.text_attention("last", layer="self")  # (S, N)
