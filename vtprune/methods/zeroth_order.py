"""Zeroth-order sensitivity of the projector combined with cosine diversity (ZOO-Prune).

Paper: "ZOO-Prune: ..." (CVPR 2026), arXiv:2509.24837. Official code: AIM-SKKU/ZOO-Prune
(``LLaVA/llava/model/llava_arch.py``: the sensitivity pass and ``select_tokens_sads``).

Sensitivity of token i: with m = 64 random unit directions u_j in the ViT feature space, shared by all the
tokens of a call, S_i = mean_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / (2h), h = 0.01, M the projector
(a zeroth-order estimate of E ||J_M(x_i) u||). Selection (SADS): S is min-max normalised to S^; the first
pick maximises S^; every next pick maximises (min cosine distance to the selected set) * S^ over the
projected tokens. Kept tokens keep their order and positions.

``estimator="jvp"`` (default) computes the same directional derivatives exactly (forward-mode autodiff,
the h -> 0 limit) in float32; ``estimator="central"`` runs the reference's finite differences, in the
reference's float16 with ``dtype="float16"``. The directions are drawn on CPU from ``seed``, so results do
not depend on the device, the batch or the order of samples. The m perturbations are batched (``chunk``
directions per projector call), never looped token by token.

Differences from the reference:
  * The reference differences are taken in float16, where h * u (~3e-4 per coordinate) is about one
    rounding unit: the scores are dominated by rounding (on a random GELU MLP the fp16 ranking's top-16
    overlapped the exact one in 2 of 16 tokens). The default ``jvp`` estimator is the exact quantity the
    finite difference approximates.
  * Directions come from a seeded generator instead of the global RNG (reference results depend on the
    order samples are evaluated in).
  * LLaVA-NeXT: one selection per image with vtprune's budget (the reference splits the budget over crops
    and, through an indexing bug, keeps the wrong tokens instead of the newline tokens); the reference's
    rank-128 low-rank projector for NeXT is not reproduced (it is built from un-loaded weights).
  * Budget rounding: the reference keeps int(SUBSET_RATIO * N) (floor); vtprune's ratio rounds. ``keep=64``
    equals SUBSET_RATIO = 0.1112 on 576 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import Method
from vtprune.methods.kcenter import cosine_distance
from vtprune.signals import Signals
from vtprune.registry import METHODS


def directions(m: int, dim: int, seed: int) -> torch.Tensor:
    """(m, dim) unit directions from a seeded CPU generator."""
    u = torch.randn(m, dim, generator=torch.Generator().manual_seed(seed))
    return u / (u.norm(dim=-1, keepdim=True) + 1e-12)


def sensitivity(x: torch.Tensor, projector, u: torch.Tensor, h: float = 0.01, estimator: str = "jvp",
                dtype: torch.dtype = torch.float32, chunk: int = 8) -> torch.Tensor:
    """(S, N) mean over directions of ||J_M(x) u_j|| for features x (S, N, Dv) and directions u (m, Dv)."""
    S, N, dv = x.shape
    flat = x.reshape(-1, dv)  # (S*N, Dv)
    total = torch.zeros(flat.shape[0], device=x.device, dtype=torch.float32)
    for start in range(0, u.shape[0], chunk):
        uc = u[start : start + chunk].to(x.device)  # (c, Dv)
        c = uc.shape[0]
        xs = flat[None].expand(c, -1, -1).reshape(-1, dv)  # (c*S*N, Dv)
        us = uc[:, None].expand(-1, flat.shape[0], -1).reshape(-1, dv)
        if estimator == "jvp":  # exact directional derivatives, in the features' (the model's) dtype
            _, tangent = torch.func.jvp(projector, (xs,), (us.to(xs.dtype),))
            norms = tangent.float().norm(dim=-1)
        else:
            plus = projector((xs + h * us).to(dtype)).float()
            minus = projector((xs - h * us).to(dtype)).float()
            norms = (plus - minus).norm(dim=-1) / (2 * h)
        total += norms.reshape(c, -1).sum(0)
    return (total / u.shape[0]).reshape(S, N)


def sads(dist: torch.Tensor, s_hat: torch.Tensor, k: int) -> torch.Tensor:
    """Sensitivity-aware diverse selection on distances (S, N, N) and normalised sensitivity (S, N)."""
    S, N, _ = dist.shape
    rows = torch.arange(S, device=dist.device)
    first = s_hat.argmax(-1)
    picks = [first]
    mind = dist[rows, first].clone()  # (S, N) distance to the nearest selected token
    taken = torch.zeros(S, N, dtype=torch.bool, device=dist.device)
    taken[rows, first] = True
    for _ in range(1, k):
        nxt = (mind * s_hat).masked_fill(taken, float("-inf")).argmax(-1)
        picks.append(nxt)
        taken[rows, nxt] = True
        mind = torch.minimum(mind, dist[rows, nxt])
    return torch.stack(picks, 1)


@METHODS.register("zeroth_order", aliases=("zoo_prune", "zooprune"))
@dataclass(frozen=True, kw_only=True)
class ZerothOrder(Method):
    """ZOO-Prune: projector sensitivity (m random directions) times cosine diversity, greedy."""

    name = "zeroth_order"
    stage = "input"
    requires = frozenset({"tokens", "vit_features", "projector"})

    m: int = 64
    h: float = 0.01
    seed: int = 0
    estimator: str = "jvp"
    dtype: str = "float32"
    chunk: int = 8

    def validate(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"zeroth_order: m must be an integer >= 1, got {self.m!r}")
        if not self.h > 0:
            raise ValueError(f"zeroth_order: h must be > 0, got {self.h!r}")
        if self.estimator not in ("jvp", "central"):
            raise ValueError(f"zeroth_order: estimator={self.estimator!r}; allowed: 'jvp', 'central'")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"zeroth_order: dtype={self.dtype!r}; allowed: 'float32', 'float16', 'bfloat16'")

    def scores(self, sig: Signals) -> torch.Tensor:
        """(S, N) min-max normalised sensitivity S^ (all ones when constant, as the reference)."""
        x = sig.vit_features  # (S, N, Dv)
        u = directions(self.m, x.shape[-1], self.seed)
        s = sensitivity(x, sig.projector, u, self.h, self.estimator, getattr(torch, self.dtype), self.chunk)
        lo, hi = s.min(-1, keepdim=True).values, s.max(-1, keepdim=True).values
        return torch.where(hi > lo, (s - lo) / (hi - lo + 1e-8), torch.ones_like(s))

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return sads(cosine_distance(sig.tokens), self.scores(sig), k)
