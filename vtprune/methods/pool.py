"""Uniform spatial pooling baseline: k evenly spread cells per span, one token each.

Paper: none; the "downsample the image" baseline that UniPruneBench (arXiv:2511.02650) and VTC-Bench
(arXiv:2510.07143) find hard to beat.

Each span's tokens are partitioned into exactly k spatially contiguous cells. A span's grids (LLaVA-NeXT's
base tile and AnyRes canvas; the frames of a video span) share k in proportion to their size (largest
remainder). A full h x w grid is cut into ``kh`` row bands of near-equal height, band i into ``c_i``
near-equal columns (sum c_i = k, c_i proportional to the band's height, kh chosen so that cells are
close to square); a grid with holes (tokens
already pruned by an earlier stage) is cut into k runs of consecutive raster-order tokens. Each cell keeps
the token nearest its centre, at that token's original position; with ``merge="mean"`` (default) the kept
token's representation becomes the mean of its cell (average pooling), with ``merge="none"`` it is kept
as is (strided subsampling).

Differences from the reference: none defined (a baseline); pooling acts on the representation where the
method acts (projected tokens before the LLM, hidden states at ``layer=K``), not on pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.methods.base import Method, Selection
from vtprune.signals import Signals
from vtprune.registry import METHODS


def _split(k: int, weights: list[int], caps: list[int] | None = None) -> list[int]:
    """Largest-remainder apportionment of k in proportion to ``weights``, each part at most its cap
    (default: its weight). Earlier parts win ties."""
    caps = caps or weights
    total = sum(weights)
    quotas = [k * s / total for s in weights]
    out = [min(c, math.floor(q)) for c, q in zip(caps, quotas)]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    i = 0
    while sum(out) < k:
        j = order[i % len(order)]
        if out[j] < caps[j]:
            out[j] += 1
        i += 1
    return out


def grid_cells(rows: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    """Cell id in [0, k) of each token of ONE grid given its (row, col); tokens in raster order."""
    n = rows.numel()
    r, c = rows - rows.min(), cols - cols.min()
    h, w = int(r.max()) + 1, int(c.max()) + 1
    if n != h * w:  # holes: k runs of consecutive raster-order tokens
        return torch.arange(n, device=rows.device) * k // n
    kh = min(h, k, max(math.ceil(k / w), round(math.sqrt(k * h / w))))
    band = r * kh // h  # (n,) band of each row: kh bands of near-equal height
    heights = torch.bincount(band[c == 0], minlength=kh).tolist()
    # columns per band in proportion to its height, so that every cell has about the same area
    per_band = torch.tensor(_split(k, heights, caps=[w] * kh), device=rows.device)  # (kh,)
    offset = torch.cumsum(per_band, 0) - per_band  # (kh,)
    return offset[band] + c * per_band[band] // w


def spatial_pool(grid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One span: grid (N, 3) (group, row, col) -> (cell (N,) in [0, k), representative (k,) index)."""
    N = grid.shape[0]
    order = torch.argsort(grid[:, 0] * (1 << 40) + grid[:, 1] * (1 << 20) + grid[:, 2], stable=True)  # raster
    groups, sizes = torch.unique_consecutive(grid[order, 0], return_counts=True)
    cell = torch.empty(N, dtype=torch.long, device=grid.device)
    start, base = 0, 0
    for size, kg in zip(sizes.tolist(), _split(k, sizes.tolist())):
        idx = order[start : start + size]
        if kg > 0:
            cell[idx] = base + grid_cells(grid[idx, 1], grid[idx, 2], kg)
        else:  # no budget for this grid: fold it into the previous cell (never happens for k >= #groups)
            cell[idx] = max(base - 1, 0)
        start, base = start + size, base + kg
    # Representative: the member nearest the cell's centroid (first one on ties).
    pos = grid[:, 1:].float()  # (N, 2)
    counts = torch.bincount(cell, minlength=k).clamp(min=1)  # (k,)
    centre = torch.zeros(k, 2, device=grid.device).index_add_(0, cell, pos) / counts[:, None]
    d = ((pos - centre[cell]) ** 2).sum(-1)  # (N,)
    key = cell.double() * 1e12 + d.double() * 1e3 + torch.arange(N, device=grid.device).double() * 1e-6
    rep = torch.full((k,), -1, dtype=torch.long, device=grid.device)
    first = torch.argsort(key)  # members sorted by (cell, distance, index)
    is_first = torch.ones(N, dtype=torch.bool, device=grid.device)
    is_first[1:] = cell[first[1:]] != cell[first[:-1]]
    rep[cell[first[is_first]]] = first[is_first]
    return cell, rep


@METHODS.register("pool", aliases=("downsample",))
@dataclass(frozen=True, kw_only=True)
class SpatialPool(Method):
    """k evenly spread spatial cells per span; keep one token per cell, mean-pooled by default."""

    name = "pool"
    stage = "input"
    requires = frozenset({"grid", "tokens"})

    merge: str = "mean"  # "mean": average pooling; "none": strided subsampling

    def validate(self) -> None:
        if self.merge not in ("mean", "none"):
            raise ValueError(f"pool: merge={self.merge!r} is not allowed; allowed: 'mean', 'none'")

    def select(self, sig: Signals, k: int) -> Selection:
        grid = sig.grid  # (S, N, 3)
        reps, values = [], []
        for s in range(grid.shape[0]):
            cell, rep = spatial_pool(grid[s], k)  # (N,), (k,)
            reps.append(rep)
            if self.merge == "mean":
                x = sig.tokens[s]  # (N, D)
                summed = torch.zeros(k, x.shape[-1], dtype=torch.float32, device=x.device)
                summed.index_add_(0, cell, x.float())
                values.append((summed / torch.bincount(cell, minlength=k)[:, None]).to(x.dtype))  # (k, D)
        index = torch.stack(reps)  # (S, k)
        return Selection(index, torch.stack(values) if values else None)
