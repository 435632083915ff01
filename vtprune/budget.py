"""How many visual tokens survive: ``ratio`` xor ``keep``, applied per span.

* ``ratio`` is the fraction of a span's visual tokens REMOVED, in [0, 1) (kvpress / tomesd convention);
  the span keeps ``max(1, round((1 - ratio) * n))`` tokens (Python's round: half to even).
* ``keep`` is an absolute count per span (papers quote "64 tokens"); a span with ``n <= keep`` is untouched.

A *span* is the unit a budget applies to, chosen by the policy:

* ``"per_frame"`` (default): every image is one span and every video frame is one span;
* ``"per_image"``: every image is one span and a whole video is one span;
* ``"global"``: all visual tokens of one sample (batch row) form one span, so images compete.
* ``"temporal"``: every frame is a span, but a video's total (the sum of its per-frame budgets) is
  re-allocated across its frames by novelty: frame f's share is proportional to
  1 - cos(mean token of f, mean token of f-1) (the first frame counts as fully novel), so frames that
  repeat their predecessor get fewer tokens (at least 1, at most all); images behave as ``per_frame``.

Structural tokens are never candidates and never count: LLaVA-NeXT's ``image_newline`` tokens are kept
exactly when their row of the AnyRes canvas keeps at least one token (see README, "AnyRes rule").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch

Policy = Literal["per_frame", "per_image", "global", "temporal"]
POLICIES: tuple[str, ...] = ("per_frame", "per_image", "global", "temporal")


def check_ratio(ratio: object, *, owner: str = "prune()") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(float(ratio)):
        raise ValueError(f"{owner}: ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(
            f"{owner}: ratio={ratio!r} is outside [0, 1); ratio is the fraction of visual tokens REMOVED "
            "(ratio=0.889 keeps 64 of 576). Use keep=K for an absolute count."
        )
    return float(ratio)


def check_keep(keep: object, *, owner: str = "prune()") -> int:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or int(keep) < 1:
        raise ValueError(f"{owner}: keep must be an integer >= 1 (visual tokens kept per span), got {keep!r}")
    return int(keep)


def span_ids(policy: str, image: torch.Tensor, frame: torch.Tensor,
             cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spans of ``policy`` over one sequence's candidates.

    ``image`` / ``frame`` (B, L) long: each token's image (or video) and frame; ``cand`` (B, L) bool. Returns
    ``ids`` (B, L) long, each candidate's span (-1 elsewhere), numbered in (image, frame) order (``global``:
    batch-row order), and ``owner`` (S,) long, the image (or, for ``global``, the batch row) of each span.
    A sequence's tokens keep their order inside a span.
    """
    check_policy(policy)
    row = torch.arange(cand.shape[0], device=cand.device)[:, None].expand_as(cand)
    columns = {"per_frame": (image, frame), "temporal": (image, frame), "per_image": (image,),
               "global": (row,)}[policy]
    keys = torch.stack([c[cand] for c in columns], dim=1)  # (n_cand, C)
    if keys.numel() == 0:
        return torch.full_like(image, -1), torch.zeros(0, dtype=torch.long, device=cand.device)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # (S, C) sorted, (n_cand,)
    ids = torch.full_like(image, -1)
    ids[cand] = inverse
    return ids, unique[:, 0]


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise ValueError(f"budget={policy!r} is not a budget policy; allowed: {', '.join(map(repr, POLICIES))}")
    return policy  # type: ignore[return-value]


@dataclass(frozen=True)
class Budget:
    """A resolved budget: exactly one of ``ratio`` / ``keep``, plus the span policy."""

    ratio: float | None = None
    keep: int | None = None
    policy: str = "per_frame"

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.keep is None):
            raise ValueError(
                f"give exactly one of ratio= or keep= (got ratio={self.ratio!r}, keep={self.keep!r})"
            )
        if self.ratio is not None:
            check_ratio(self.ratio)
        if self.keep is not None:
            check_keep(self.keep)
        check_policy(self.policy)

    def count(self, n: int) -> int:
        """Tokens kept in a span of ``n`` candidate tokens."""
        if n <= 0:
            return 0
        if self.keep is not None:
            return min(self.keep, n)
        return min(n, max(1, round((1.0 - self.ratio) * n)))  # type: ignore[operator]

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    @staticmethod
    def allocate(total: int, weights: list[float], sizes: list[int]) -> list[int]:
        """Split ``total`` tokens over frames in proportion to ``weights``: at least 1 and at most
        ``sizes[f]`` per frame, exactly ``min(total, sum(sizes))`` in all (water-filling with floors, then
        the remainder by largest fractional share; earlier frames win ties)."""
        total = min(total, sum(sizes))
        out = [min(1, s) for s in sizes]
        if sum(out) > total:  # fewer tokens than frames (never with per-frame budgets >= 1): most novel first
            out = [0] * len(sizes)
            for i in sorted((i for i, s in enumerate(sizes) if s), key=lambda i: (-weights[i], i))[:total]:
                out[i] = 1
        while (left := total - sum(out)) > 0:
            room = [i for i, s in enumerate(sizes) if out[i] < s]
            wsum = sum(weights[i] for i in room)
            share = {i: left * weights[i] / wsum for i in room}
            floors = {i: min(sizes[i] - out[i], math.floor(share[i])) for i in room}
            if not any(floors.values()):  # less than one token per frame left: largest shares first
                for i in sorted(room, key=lambda i: (-share[i], i))[:left]:
                    out[i] += 1
                break
            for i, f in floors.items():
                out[i] += f
        return out

    def __str__(self) -> str:
        amount = f"ratio={self.ratio:g}" if self.ratio is not None else f"keep={self.keep}"
        return f"{amount}, {self.policy}"
