"""Greedy selection steps: k-center (DivPrune), MMR (IDPruner) and maximum coverage (MMTok).

Each method picks K of N tokens with K greedy steps. A step updates one running statistic per token with
the newest pick (distance to the nearest centre, max similarity to the selected set, or the covered
amount of each row) and takes the argmax of the resulting score. The Triton path fuses that update with
a block-level argmax in one launch per step for all spans at once, computing similarities on the fly
from L2-normalised rows: selecting K of N costs K launches and O(K·N·D) work, and no N × N matrix exists.

All scores are float32 whatever the input dtype. Ties go to the smallest index (``torch.argmax``'s rule),
so the Triton and torch paths pick the same indices unless two scores differ only by float rounding.
Non-finite inputs raise: a NaN would otherwise silently decide the selection.

The Triton kernels live in :mod:`vtprune.kernels.greedy_triton`, imported on first use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import load_triton_module, resolve_backend

# AngelSlim's IDPruner initialises the running max similarity to -2.0 (the paper says -1; any value
# <= -1 gives the same picks after the first step, since cosine similarity is >= -1).
MMR_INIT_SIM = -2.0


# The torch path precomputes the S x N x N cosine matrix when it is this small (elements): on a CPU, one
# matmul plus K row reads beats K mat-vecs by 10-20x (576 tokens of width 4096, K=288: 37 vs 710 ms).
DENSE_MAX = 1 << 26


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """(S, N, D) -> (S, N, D) float32 rows of unit L2 norm (zero rows stay zero), computed once per call."""
    return F.normalize(x.float(), dim=-1)


def similarity_rows(xn: torch.Tensor):
    """``rows(j) -> (S, N)`` cosine of every token with token j[s] of each span: a precomputed Gram when it
    fits DENSE_MAX, one batched mat-vec per call otherwise (the streaming form the Triton kernels use)."""
    S, N, _ = xn.shape
    ar = torch.arange(S, device=xn.device)
    if S * N * N <= DENSE_MAX:
        gram = xn @ xn.transpose(1, 2)  # (S, N, N)
        return lambda j: gram[ar, j]
    return lambda j: torch.bmm(xn, xn[ar, j][:, :, None])[:, :, 0]


def _check_tokens(x: torch.Tensor, k: int, name: str = "x") -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be (S, N, D); got shape {tuple(x.shape)}")
    if not 0 <= k <= x.shape[1]:
        raise ValueError(f"k={k} must be in [0, N={x.shape[1]}] ({name} has N={x.shape[1]} tokens per span)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; refusing to select from non-finite values")


def _check_kcenter(x: torch.Tensor, k: int, first: torch.Tensor) -> None:
    _check_tokens(x, k)
    S, N, _ = x.shape
    if first.shape != (S,):
        raise ValueError(f"first must be (S={S},); got {tuple(first.shape)}")
    if k and S and not bool(((first >= 0) & (first < N)).all()):
        raise ValueError(f"first has indices outside [0, N={N})")


def _check_mmr(x: torch.Tensor, importance: torch.Tensor, k: int, lam: float) -> None:
    _check_tokens(x, k)
    if importance.shape != x.shape[:2]:
        raise ValueError(f"importance must be (S, N)={tuple(x.shape[:2])}; got {tuple(importance.shape)}")
    if not bool(torch.isfinite(importance).all()):
        raise ValueError("importance contains NaN or inf; refusing to select from non-finite scores")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} must be in [0, 1]")


def _check_coverage(cov: torch.Tensor, k: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Validate; return ``valid`` as (S, N) bool (all True if None)."""
    if cov.dim() != 3:
        raise ValueError(f"cov must be (S, M, N); got shape {tuple(cov.shape)}")
    S, _, N = cov.shape
    valid = torch.ones(S, N, dtype=torch.bool, device=cov.device) if valid is None else valid.bool()
    if valid.shape != (S, N):
        raise ValueError(f"valid must be (S={S}, N={N}); got {tuple(valid.shape)}")
    n_valid = int(valid.sum(1).min()) if S else N
    if k < 0 or k > n_valid:
        raise ValueError(f"k={k} exceeds the number of valid columns ({n_valid} in the smallest span); "
                         "greedy_coverage never picks an invalid column")
    if not bool(torch.isfinite(cov).all()):
        raise ValueError("cov contains NaN or inf; refusing to select from non-finite values")
    return valid


# --------------------------------------------------------------------------------------------- k-center


def greedy_kcenter_ref(x: torch.Tensor, k: int, first: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch :func:`greedy_kcenter` (the same update; cosines from a precomputed Gram when it fits, or from
    the caller's ``gram``)."""
    _check_kcenter(x, k, first)
    S, N, _ = x.shape
    picks = torch.empty(S, k, dtype=torch.long, device=x.device)
    if k == 0:
        return picks
    rows = torch.arange(S, device=x.device)
    sim = similarity_rows(normalize_rows(x)) if gram is None else (lambda j: gram[rows, j])
    picks[:, 0] = first
    mind = torch.full((S, N), float("inf"), device=x.device)  # distance to the nearest selected token
    for t in range(1, k):
        prev = picks[:, t - 1]  # (S,)
        dist = 1.0 - sim(prev)  # (S, N) 1 - cos to the newest pick
        mind = torch.minimum(mind, dist)
        mind[rows, prev] = float("-inf")  # selected stay at -inf: min(-inf, .) = -inf
        picks[:, t] = mind.argmax(-1)
    return picks


def greedy_kcenter(x: torch.Tensor, k: int, first: torch.Tensor, *, backend: str = "auto",
                   gram: torch.Tensor | None = None) -> torch.Tensor:
    """Farthest-point (max-min) greedy on cosine distance d(i, j) = 1 - cos(x_i, x_j).

    Args:
        x: (S, N, D) tokens of S independent spans, any float dtype.
        k: number of picks per span, 0 <= k <= N.
        first: (S,) int64 first pick of each span.
        gram: optional (S, N, N) float32 cosines of ``x`` the caller has already computed (the torch path reads
            them instead of computing its own; the Triton path computes on the fly either way).

    Returns:
        (S, k) int64 picks in selection order: ``picks[:, 0] = first``; each next pick maximises the
        distance to its nearest already selected token.
    """
    if resolve_backend(backend, x.device) == "torch":
        return greedy_kcenter_ref(x, k, first, gram)
    return load_triton_module("greedy_triton").greedy_kcenter_triton(x, k, first)


# --------------------------------------------------------------------------------------------------- MMR


def greedy_mmr_ref(x: torch.Tensor, importance: torch.Tensor, k: int, lam: float = 0.5) -> torch.Tensor:
    """Pure-torch :func:`greedy_mmr`."""
    _check_mmr(x, importance, k, lam)
    S, N, _ = x.shape
    picks = torch.empty(S, k, dtype=torch.long, device=x.device)
    if k == 0:
        return picks
    sim_rows = similarity_rows(normalize_rows(x))
    imp = importance.float()  # (S, N)
    rows = torch.arange(S, device=x.device)
    picks[:, 0] = imp.argmax(-1)
    sim_max = torch.full((S, N), MMR_INIT_SIM, device=x.device)  # max cos to the selected set
    taken = torch.zeros(S, N, dtype=torch.bool, device=x.device)
    for t in range(1, k):
        prev = picks[:, t - 1]
        sim_max = torch.maximum(sim_max, sim_rows(prev))  # (S, N)
        taken[rows, prev] = True
        score = (lam * imp - (1.0 - lam) * sim_max).masked_fill(taken, float("-inf"))
        picks[:, t] = score.argmax(-1)
    return picks


def greedy_mmr(
    x: torch.Tensor, importance: torch.Tensor, k: int, lam: float = 0.5, *, backend: str = "auto"
) -> torch.Tensor:
    """Maximal Marginal Relevance selection (IDPruner).

    Args:
        x: (S, N, D) tokens; similarity is the cosine of L2-normalised rows (float32).
        importance: (S, N) relevance of each token.
        k: picks per span, 0 <= k <= N.
        lam: trade-off in [0, 1]; 1 = importance only, 0 = diversity only.

    Returns:
        (S, k) int64 picks in order. Step 0 takes argmax(importance); step t > 0 takes the argmax over
        unselected tokens of ``lam * importance - (1 - lam) * max_sim``, where ``max_sim`` is the running
        max similarity to the selected set (initialised to -2.0, as in AngelSlim's code).
    """
    if resolve_backend(backend, x.device) == "torch":
        return greedy_mmr_ref(x, importance, k, lam)
    return load_triton_module("greedy_triton").greedy_mmr_triton(x, importance, k, lam)


# ---------------------------------------------------------------------------------------------- coverage


def greedy_coverage_ref(cov: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch :func:`greedy_coverage` (materialises one (S, M, N) temporary per step)."""
    valid = _check_coverage(cov, k, valid)
    S, M, N = cov.shape
    picks = torch.empty(S, k, dtype=torch.long, device=cov.device)
    c = cov.float()  # (S, M, N)
    rows = torch.arange(S, device=cov.device)
    best = torch.zeros(S, M, device=cov.device)  # how well each row is covered so far
    taken = ~valid  # (S, N) excluded or already selected
    for t in range(k):
        gain = (c - best[:, :, None]).clamp_min(0).sum(1)  # (S, N) marginal coverage of each column
        pick = gain.masked_fill(taken, float("-inf")).argmax(-1)  # (S,)
        picks[:, t] = pick
        taken[rows, pick] = True
        best = torch.maximum(best, c[rows, :, pick])
    return picks


def greedy_coverage(
    cov: torch.Tensor, k: int, valid: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Greedy maximum coverage (MMTok): pick the columns that best cover the rows.

    Args:
        cov: (S, M, N) coverage matrix; rows are what must be covered (text tokens then visual tokens),
            columns are the candidate tokens.
        k: picks per span; must not exceed the number of valid columns of any span (ValueError otherwise).
        valid: (S, N) bool or None; invalid columns are never picked.

    Returns:
        (S, k) int64 picks in order. With ``best`` (S, M) starting at 0, each step takes the unselected valid
        column maximising ``sum_i max(cov[i, j] - best_i, 0)`` and then sets ``best = max(best, cov[:, j])``.
    """
    if resolve_backend(backend, cov.device) == "torch":
        return greedy_coverage_ref(cov, k, valid)
    return load_triton_module("greedy_triton").greedy_coverage_triton(cov, k, valid)
