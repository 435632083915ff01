"""Random baseline: keep a uniformly random subset of each span's visual tokens.

Paper: none (the baseline every token-pruning paper reports; UniPruneBench and VTC-Bench find it strong).

Seeded per span: the draw depends only on ``seed``, the span's ordinal within its sample and its size,
so a sample gets the same tokens alone or in any batch, and reruns reproduce exactly.

Differences from the reference: FastV's K=0 "random" draws a fresh mask per forward from the global RNG;
ours is reproducible and batch-invariant instead (the same ordinal and size give the same subset in
every sample; vary ``seed`` to average over masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import ScoreMethod
from vtprune.signals import Signals
from vtprune.registry import METHODS


def random_scores(num_spans_ordinals: list[int], n: int, seed: int, device: torch.device) -> torch.Tensor:
    """(S, n) uniform scores, one seeded CPU generator per span (so results match across devices)."""
    rows = []
    for ordinal in num_spans_ordinals:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + ordinal)
        rows.append(torch.rand(n, generator=gen))
    return torch.stack(rows).to(device)  # (S, n)


@METHODS.register("random")
@dataclass(frozen=True, kw_only=True)
class RandomPrune(ScoreMethod):
    """Keep a seeded random subset of each span (acts before the LLM, or at ``layer=K``)."""

    name = "random"
    stage = "input"

    seed: int = 0

    def validate(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"random: seed must be an integer >= 0, got {self.seed!r}")

    def score(self, sig: Signals) -> torch.Tensor:
        return random_scores(sig.ordinals.tolist(), sig.num_tokens, self.seed, sig.device)  # (S, N)
