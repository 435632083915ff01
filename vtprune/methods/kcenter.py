"""Diversity by greedy selection on cosine geometry: DivPrune (k-center) and ToDRE (pivot + diversity).

``variant="divprune"`` (default). Paper: "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models" (Alvar et al., CVPR 2025), arXiv:2503.02175. Official code: vbdi/divprune.
``variant="todre"``: ToDRE, arXiv:2505.18757 v2 (no official code exists): the token with the highest
[CLS] attention of the last ViT layer is the pivot, then greedy max-sum diversification (each next token
minimises its cumulative cosine similarity to the selected set); ``"todre_v1"``: the v1 abstract's greedy
k-center from the same pivot. Optional stage 2 (``drop_layer``, "information migration"): at decoder layer
round(7L/8), a span whose text->visual attention mass is below ``tau`` = 0.10 loses all its visual tokens.

On the projected visual tokens (the LLM input, ``LAYER_INDEX=0``) with d(i, j) = 1 - cos(x_i, x_j):
the first pick is the token whose nearest other token is farthest (argmax over j of the second-smallest
d(., j); the smallest is d(j, j) = 0); every further pick maximises the distance to the nearest
selected token (Gonzalez' farthest-point greedy for the max-min diversity problem). Kept tokens keep
their original order and positions.

Differences from the reference:
  * O(kN) running minimum instead of recomputing the min over all selected rows each step (O(k^2 N));
    same picks (one fused kernel launch per pick on GPU). Already-selected tokens are excluded
    explicitly, so exact duplicates can never be picked twice (the reference relies on d(j, j) = 0).
  * Distances are computed in float32 whatever the model dtype (the reference uses the model dtype).
  * LLaVA-NeXT: the reference selects once over the whole flattened sequence, ``image_newline``
    tokens included; vtprune never selects newline tokens (they follow the AnyRes rule) and applies the
    budget per span (image / frame, or per sample with ``budget="global"``). Batches > 1 and several
    images per prompt are supported (the reference prunes one image at offset 35, batch size 1).
  * ``keep=`` / ``ratio=`` replace ``SUBSET_RATIO`` (kept fraction): ``ratio = 1 - SUBSET_RATIO``, and
    both round the same way (``round``), so ``SUBSET_RATIO=0.098`` equals ``ratio=0.902`` (56 of 576).
  * ToDRE: written from the paper (no code exists). Towers without [CLS]: the default ``pivot="auto"``
    takes the token with the highest received attention (or ``pivot="random"``: the paper's appendix
    finds a random pivot within 0.3 points of the [CLS] one); stage
    2's visual->text term is 0 for a causal LLM with the instruction after the image, so the gate reads the
    text->visual mass of the span; a dropped span keeps no token (the only case where a span ends below
    its budget, by design of the method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dataclasses

from vtprune.kernels import greedy_kcenter
from vtprune.kernels.greedy import normalize_rows, similarity_rows
from vtprune.methods.base import LayerSpec, Method, Selection
from vtprune.signals import Signals
from vtprune.registry import METHODS


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """(S, N, D) -> (S, N, N) pairwise cos, in float32."""
    xn = normalize_rows(x)  # (S, N, D)
    return xn @ xn.transpose(1, 2)  # (S, N, N)


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """(S, N, D) -> (S, N, N) pairwise 1 - cos, in float32."""
    return 1.0 - cosine_similarity(x)


def divprune(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune selection on (S, N, D) tokens -> (S, k) indices in pick order."""
    gram = cosine_similarity(x)  # (S, N, N)
    N = gram.shape[-1]
    if N == 1:
        return torch.zeros(gram.shape[0], k, dtype=torch.long, device=gram.device)
    # First pick: the largest nearest-neighbour distance (2nd smallest of each column; the smallest is self).
    nn_dist = (1.0 - gram).topk(2, dim=1, largest=False).values[:, 1, :]  # (S, N)
    first = nn_dist.argmax(dim=-1)  # (S,)
    # the steps: the torch path reads this Gram's rows (no second N x N product), Triton fuses them on the fly
    return greedy_kcenter(x, k, first, gram=gram)


def max_sum_diverse(x: torch.Tensor, k: int, first: torch.Tensor) -> torch.Tensor:
    """ToDRE v2: from pivot ``first`` (S,), repeatedly add the token with the least cumulative cosine
    similarity to the selected set -> (S, k) picks."""
    S, N = x.shape[:2]
    rows = torch.arange(S, device=x.device)
    sim = similarity_rows(normalize_rows(x))  # j -> (S, N) cosines: a Gram's rows when it fits, else mat-vecs
    taken = torch.zeros(S, N, dtype=torch.bool, device=x.device)
    acc = torch.zeros(S, N, device=x.device)  # cumulative similarity to the selected set
    picks, nxt = [], first
    for _ in range(k):
        picks.append(nxt)
        taken[rows, nxt] = True
        acc = acc + sim(nxt)
        nxt = acc.masked_fill(taken, torch.inf).argmin(-1)  # first index on ties
    return torch.stack(picks, 1)


VARIANTS = ("divprune", "todre", "todre_v1")
PIVOTS = ("auto", "cls", "received", "random")


@METHODS.register("kcenter", aliases=("divprune",))
@dataclass(frozen=True, kw_only=True)
class KCenter(Method):
    """Greedy diversity on the tokens where it acts (LLM input by default): DivPrune or ToDRE."""

    name = "kcenter"
    stage = "input"
    requires = frozenset({"tokens"})

    variant: str = "divprune"
    pivot: str = "auto"  # ToDRE: "cls", "received", "random"; "auto": cls, or received without [CLS]
    vit_layer: int | None = None  # ToDRE pivot layer (hidden-states index); None: the last layer (-1)
    seed: int = 0  # ToDRE random pivot
    drop_layer: int | str | None = None  # ToDRE stage 2: a decoder layer, "auto" (= round(7L/8)) or None
    tau: float = 0.10

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            allowed = ", ".join(map(repr, VARIANTS))
            raise ValueError(f"kcenter: variant={self.variant!r} is not known; allowed: {allowed}")
        if self.pivot not in PIVOTS:
            raise ValueError(f"kcenter: pivot={self.pivot!r}; allowed: {', '.join(map(repr, PIVOTS))}")
        if self.drop_layer is not None and self.variant == "divprune":
            raise ValueError("kcenter: drop_layer is ToDRE's stage 2; use variant='todre'")
        if self.drop_layer is not None and self.drop_layer != "auto" and (
                isinstance(self.drop_layer, bool) or not isinstance(self.drop_layer, int) or self.drop_layer < 1):
            raise ValueError(f"kcenter: drop_layer must be 'auto', a layer >= 1 or None, got {self.drop_layer!r}")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        if self.variant == "divprune" or self.pivot == "random":
            return self.requires
        if self.pivot == "cls" or (self.pivot == "auto" and has_cls):
            return self.requires | {"cls_attention"}
        return self.requires | {"received_attention"}

    def resolve(self, num_layers: int) -> Method:
        if self.variant != "divprune" and self.vit_layer is None:
            return dataclasses.replace(self, vit_layer=-1)  # ToDRE: [CLS] attention of the last ViT layer
        return self

    def expand(self, num_layers: int) -> list[Method]:
        if self.drop_layer is None:
            return [self]
        layer = round(7 * num_layers / 8) if self.drop_layer == "auto" else self.drop_layer
        gate = MigrationDrop(layer=min(layer, num_layers - 1), tau=self.tau)
        return [dataclasses.replace(self, drop_layer=None), gate]

    def _pivot(self, sig: Signals) -> torch.Tensor:
        if self.pivot == "random":
            from vtprune.methods.random import random_scores

            score = random_scores(sig.ordinals.tolist(), sig.num_tokens, self.seed, sig.device)
        elif self.pivot == "cls" or (self.pivot == "auto" and sig.has_cls):
            score = sig.cls_attention(self.vit_layer)
        else:
            score = sig.received_attention(self.vit_layer)
        return torch.sort(score.float(), dim=-1, descending=True, stable=True).indices[:, 0]  # (S,)

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        if self.variant == "divprune":
            return divprune(sig.tokens, k)  # (S, k)
        first = self._pivot(sig)
        if self.variant == "todre":
            return max_sum_diverse(sig.tokens, k, first)
        return greedy_kcenter(sig.tokens, k, first)


@METHODS.register("todre_drop")
@dataclass(frozen=True, kw_only=True)
class MigrationDrop(Method):
    """ToDRE stage 2 ("information migration"): at layer K, drop ALL visual tokens of a span whose
    text->visual attention mass (mean over the instruction tokens of layer K-1, summed over the span) is
    below ``tau``; other spans are untouched. Added by ``kcenter(variant="todre", drop_layer=...)``."""

    name = "todre_drop"
    stage = "layer"
    pre_llm_ok = False
    gate = True
    requires = frozenset({"text_attention"})
    scored_at_previous_layer = True

    layer: LayerSpec = 28
    tau: float = 0.10

    def keep_count(self, budget, n, n0, num_layers, layer):
        return n  # a gate: keeps everything unless it drops the span

    def select(self, sig: Signals, k: int) -> Selection:
        mass = sig.text_attention("instruction").sum(-1)  # (S,)
        return Selection(torch.arange(k, device=sig.device).expand(sig.num_spans, k), drop=mass < self.tau)
