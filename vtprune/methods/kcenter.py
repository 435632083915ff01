"""Diversity by greedy k-center (max-min) on cosine distance: DivPrune.

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
CVPR 2025), arXiv:2503.02175. Official code: vbdi/divprune (``DivPrune`` in ``llava_arch.py``).

On the projected visual tokens (the LLM input, ``LAYER_INDEX=0``) with d(i, j) = 1 - cos(x_i, x_j):
the first pick is the token whose nearest other token is farthest (argmax over j of the second-smallest
d(., j); the smallest is d(j, j) = 0); every further pick maximises the distance to the nearest
selected token (Gonzalez' farthest-point greedy for the max-min diversity problem). Kept tokens keep
their original order and positions.

Differences from the reference:
  * O(kN) running minimum instead of recomputing the min over all selected rows each step (O(k^2 N));
    same picks. Already-selected tokens are excluded explicitly, so exact duplicates can never be
    picked twice (the reference relies on d(j, j) = 0 being the minimum).
  * Distances are computed in float32 whatever the model dtype (the reference uses the model dtype).
  * LLaVA-NeXT: the reference selects once over the whole flattened sequence, ``image_newline``
    tokens included; vtprune never selects newline tokens (they follow the AnyRes rule) and applies the
    budget per span (image / frame, or per sample with ``budget="global"``). Batches > 1 and several
    images per prompt are supported (the reference prunes one image at offset 35, batch size 1).
  * ``keep=`` / ``ratio=`` replace ``SUBSET_RATIO`` (kept fraction): ``ratio = 1 - SUBSET_RATIO``, and
    both round the same way (``round``), so ``SUBSET_RATIO=0.098`` equals ``ratio=0.902`` (56 of 576).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.methods.base import Method
from vtprune.signals import Signals


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """(S, N, D) -> (S, N, N) pairwise 1 - cos, in float32."""
    xn = F.normalize(x.float(), dim=-1)  # (S, N, D)
    return 1.0 - xn @ xn.transpose(1, 2)  # (S, N, N)


def kcenter_greedy(dist: torch.Tensor, k: int, first: torch.Tensor) -> torch.Tensor:
    """Farthest-point greedy from ``first`` (S,) on a distance matrix (S, N, N) -> (S, k) picks."""
    S = dist.shape[0]
    rows = torch.arange(S, device=dist.device)
    picks = torch.empty(S, k, dtype=torch.long, device=dist.device)
    picks[:, 0] = first
    mind = dist[rows, first].clone()  # (S, N) distance to the nearest selected token
    mind[rows, first] = -torch.inf
    for t in range(1, k):
        nxt = mind.argmax(dim=-1)  # (S,) first index on ties, like torch.argmax in the reference
        picks[:, t] = nxt
        mind = torch.minimum(mind, dist[rows, nxt])  # (S, N)
        mind[rows, nxt] = -torch.inf  # selected stay at -inf: min(-inf, .) = -inf
    return picks


def divprune(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune selection on (S, N, D) tokens -> (S, k) indices in pick order."""
    dist = cosine_distance(x)  # (S, N, N)
    N = dist.shape[-1]
    if N == 1:
        return torch.zeros(dist.shape[0], k, dtype=torch.long, device=dist.device)
    # First pick: the largest nearest-neighbour distance (2nd smallest of each column; the smallest is self).
    nn_dist = dist.topk(2, dim=1, largest=False).values[:, 1, :]  # (S, N)
    first = nn_dist.argmax(dim=-1)  # (S,)
    return kcenter_greedy(dist, k, first)


@dataclass(frozen=True, kw_only=True)
class KCenter(Method):
    """Greedy max-min diversity (DivPrune) on the tokens where it acts (LLM input by default)."""

    name = "kcenter"
    stage = "input"
    requires = frozenset({"tokens"})

    variant: str = "divprune"

    def validate(self) -> None:
        if self.variant not in ("divprune",):
            raise ValueError(f"kcenter: variant={self.variant!r} is not known; allowed: 'divprune'")

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return divprune(sig.tokens, k)  # (S, k)
