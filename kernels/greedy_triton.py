"""Triton half of :mod:`vtprune.kernels.greedy`. Imported only when the Triton backend is first used.

One launch per greedy step for all S spans: a program per (span, block of BLOCK_N tokens) updates its
tokens' running statistic with the newest pick (read from the device, so the host never synchronises
between steps), scores them and writes its block's max and argmax. When N fits in one block the program
writes the pick itself; otherwise the argmax over the few blocks is finished in torch (one ``argmax`` +
``gather`` on an (S, n_blocks) tensor). Every program owns its tokens' state, so in-place updates are
race-free, and repeating a step is idempotent (min/max updates).

Cost per step: one read of the (S, N, D) normalised tokens (k-center, MMR) or of the (S, M, N) coverage
matrix — memory-bound, no N × N matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import block, check_launchable, device_context, interpreting
from .greedy import MMR_INIT_SIM, _check_coverage, _check_kcenter, _check_mmr, normalize_rows

INTERPRETED = interpreting()  # the mode the kernels below are decorated in


@triton.jit
def _block_argmax(score, offs, live, val_ptr, idx_ptr):
    """Store the max of ``score`` over live lanes and its smallest index (torch.argmax's tie rule)."""
    score = tl.where(live, score, float("-inf"))
    best = tl.max(score, 0)
    idx = tl.min(tl.where(live & (score == best), offs, 2147483647), 0)
    tl.store(val_ptr, best)
    tl.store(idx_ptr, idx.to(tl.int64))


@triton.jit
def _dot_with_row(x_ptr, s_xn, s_xd, offs_n, in_n, p, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_N,) fp32 dot products of rows ``offs_n`` with row ``p`` (x_ptr already at the span)."""
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        xt = tl.load(x_ptr + offs_n[:, None].to(tl.int64) * s_xn + offs_d[None, :] * s_xd,
                     mask=in_n[:, None] & in_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        xp = tl.load(x_ptr + p * s_xn + offs_d * s_xd, mask=in_d, other=0.0)  # (BLOCK_D,)
        acc += tl.sum(xt * xp[None, :], 1)
    return acc


@triton.jit
def _kcenter_step_kernel(
    x_ptr, prev_ptr, mind_ptr, val_ptr, idx_ptr,
    N, D,
    s_xs, s_xn, s_xd,  # normalised x (S, N, D)
    s_prev,  # newest pick (S,)
    s_ms, s_mn,  # min distance (S, N), updated in place
    s_vs, s_is, s_in,  # block results (S, n_blocks)
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    p = tl.load(prev_ptr + s * s_prev)
    dist = 1.0 - _dot_with_row(x_ptr + s * s_xs, s_xn, s_xd, offs_n, in_n, p, D, BLOCK_N, BLOCK_D)
    mind = tl.load(mind_ptr + s * s_ms + offs_n * s_mn, mask=in_n, other=float("-inf"))
    mind = tl.minimum(mind, dist)
    mind = tl.where(offs_n == p, float("-inf"), mind)  # selected tokens stay at -inf
    tl.store(mind_ptr + s * s_ms + offs_n * s_mn, mind, mask=in_n)
    _block_argmax(mind, offs_n, in_n, val_ptr + s * s_vs + pid_n, idx_ptr + s * s_is + pid_n * s_in)


@triton.jit
def _mmr_step_kernel(
    x_ptr, imp_ptr, prev_ptr, sim_ptr, taken_ptr, val_ptr, idx_ptr,
    N, D, lam, one_minus_lam,
    s_xs, s_xn, s_xd,  # normalised x (S, N, D)
    s_ps, s_pn,  # importance (S, N) fp32
    s_prev,
    s_ms, s_mn,  # running max similarity (S, N), in place
    s_ts, s_tn,  # taken (S, N) uint8, in place
    s_vs, s_is, s_in,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    p = tl.load(prev_ptr + s * s_prev)
    sim = _dot_with_row(x_ptr + s * s_xs, s_xn, s_xd, offs_n, in_n, p, D, BLOCK_N, BLOCK_D)
    sim_max = tl.maximum(tl.load(sim_ptr + s * s_ms + offs_n * s_mn, mask=in_n, other=0.0), sim)
    tl.store(sim_ptr + s * s_ms + offs_n * s_mn, sim_max, mask=in_n)
    taken = (tl.load(taken_ptr + s * s_ts + offs_n * s_tn, mask=in_n, other=1) != 0) | (offs_n == p)
    tl.store(taken_ptr + s * s_ts + offs_n * s_tn, taken.to(tl.uint8), mask=in_n)
    imp = tl.load(imp_ptr + s * s_ps + offs_n * s_pn, mask=in_n, other=0.0)
    # lam and 1 - lam arrive as fp32 scalars computed on the host, exactly as torch rounds them.
    score = tl.where(taken, float("-inf"), lam * imp - one_minus_lam * sim_max)
    _block_argmax(score, offs_n, in_n, val_ptr + s * s_vs + pid_n, idx_ptr + s * s_is + pid_n * s_in)


@triton.jit
def _coverage_step_kernel(
    cov_ptr, prev_ptr, best_in_ptr, best_out_ptr, taken_ptr, val_ptr, idx_ptr,
    M, N,
    s_cs, s_cm, s_cn,  # cov (S, M, N), any float dtype and strides
    s_prev,
    s_bs, s_bm,  # best (S, M) fp32, ping-pong buffers with the same strides
    s_ts, s_tn,  # taken (S, N) uint8, in place
    s_vs, s_is, s_in,
    HAS_PREV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    cov_s = cov_ptr + s * s_cs
    if HAS_PREV:
        p = tl.load(prev_ptr + s * s_prev)
    gain = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < M
        best = tl.load(best_in_ptr + s * s_bs + offs_m * s_bm, mask=in_m, other=0.0)  # (BLOCK_M,)
        if HAS_PREV:
            # Every program applies the newest pick to `best` itself; one of them writes the result to
            # the other buffer, which the next step reads (no program reads what another writes).
            col = tl.load(cov_s + offs_m.to(tl.int64) * s_cm + p * s_cn, mask=in_m, other=0.0).to(tl.float32)
            best = tl.maximum(best, col)
            if pid_n == 0:
                tl.store(best_out_ptr + s * s_bs + offs_m * s_bm, best, mask=in_m)
        c = tl.load(cov_s + offs_m[:, None].to(tl.int64) * s_cm + offs_n[None, :] * s_cn,
                    mask=in_m[:, None] & in_n[None, :], other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
        gain += tl.sum(tl.maximum(c - best[:, None], 0.0), 0)  # padded rows: max(0 - 0, 0) = 0
    taken = tl.load(taken_ptr + s * s_ts + offs_n * s_tn, mask=in_n, other=1) != 0
    if HAS_PREV:
        taken = taken | (offs_n == p)
        tl.store(taken_ptr + s * s_ts + offs_n * s_tn, taken.to(tl.uint8), mask=in_n)
    score = tl.where(taken, float("-inf"), gain)
    _block_argmax(score, offs_n, in_n, val_ptr + s * s_vs + pid_n, idx_ptr + s * s_is + pid_n * s_in)


class _Argmax:
    """Per-step block results and how they become ``picks[:, t]``."""

    def __init__(self, picks: torch.Tensor, n_blocks: int) -> None:
        S = picks.shape[0]
        self.picks = picks
        self.n_blocks = n_blocks
        self.val = torch.empty(S, n_blocks, dtype=torch.float32, device=picks.device)  # (S, n_blocks)
        self.idx = torch.empty(S, n_blocks, dtype=torch.long, device=picks.device)

    def outputs(self, t: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """(val, idx, (s_vs, s_is, s_in)): a single block writes straight into ``picks[:, t]``."""
        if self.n_blocks == 1:
            return self.val, self.picks[:, t], (self.val.stride(0), self.picks.stride(0), 0)
        return self.val, self.idx, (self.val.stride(0), self.idx.stride(0), self.idx.stride(1))

    def finish(self, t: int) -> None:
        if self.n_blocks > 1:  # blocks are in index order: argmax's first-max rule keeps the smallest index
            best = self.val.argmax(1, keepdim=True)  # (S, 1)
            self.picks[:, t] = self.idx.gather(1, best)[:, 0]


def _token_blocks(N: int, D: int, cuda: bool, block_n: int | None) -> tuple[int, int]:
    if block_n:
        return block_n, block(D, lo=16, hi=128 if cuda else 512)
    if cuda:  # many small programs: S is often 1, and one step must still fill the GPU
        return block(N, lo=16, hi=32), block(D, lo=16, hi=128)
    return block(N, lo=16, hi=1024), block(D, lo=16, hi=512)  # interpreter: few, large programs


def _compiled(t: torch.Tensor) -> bool:
    return t.is_cuda and not INTERPRETED


def greedy_kcenter_triton(
    x: torch.Tensor, k: int, first: torch.Tensor, *, block_n: int | None = None
) -> torch.Tensor:
    """Triton :func:`~vtprune.kernels.greedy.greedy_kcenter`: k - 1 fused launches.

    ``block_n`` (a power of two) fixes the tokens per program, as in the other greedy launchers.
    """
    _check_kcenter(x, k, first)
    check_launchable(x.device, INTERPRETED)
    S, N, D = x.shape
    picks = torch.empty(S, k, dtype=torch.long, device=x.device)
    if k == 0 or S == 0:
        return picks
    picks[:, 0] = first
    xn = normalize_rows(x)  # (S, N, D) fp32
    mind = torch.full((S, N), float("inf"), device=x.device)  # (S, N)
    bn, bd = _token_blocks(N, D, _compiled(x), block_n)
    am = _Argmax(picks, triton.cdiv(N, bn))
    with device_context(x.device):
        for t in range(1, k):
            val, idx, ostr = am.outputs(t)
            _kcenter_step_kernel[(S, am.n_blocks)](
                xn, picks[:, t - 1], mind, val, idx, N, D,
                *xn.stride(), picks.stride(0), *mind.stride(), *ostr,
                BLOCK_N=bn, BLOCK_D=bd,
            )
            am.finish(t)
    return picks


def greedy_mmr_triton(
    x: torch.Tensor, importance: torch.Tensor, k: int, lam: float = 0.5, *, block_n: int | None = None
) -> torch.Tensor:
    """Triton :func:`~vtprune.kernels.greedy.greedy_mmr`: one torch argmax, then k - 1 fused launches."""
    _check_mmr(x, importance, k, lam)
    check_launchable(x.device, INTERPRETED)
    S, N, D = x.shape
    picks = torch.empty(S, k, dtype=torch.long, device=x.device)
    if k == 0 or S == 0:
        return picks
    imp = importance.float()  # (S, N)
    picks[:, 0] = imp.argmax(-1)  # step 0 is importance alone
    xn = normalize_rows(x)
    sim_max = torch.full((S, N), MMR_INIT_SIM, device=x.device)
    taken = torch.zeros(S, N, dtype=torch.uint8, device=x.device)
    bn, bd = _token_blocks(N, D, _compiled(x), block_n)
    am = _Argmax(picks, triton.cdiv(N, bn))
    with device_context(x.device):
        for t in range(1, k):
            val, idx, ostr = am.outputs(t)
            _mmr_step_kernel[(S, am.n_blocks)](
                xn, imp, picks[:, t - 1], sim_max, taken, val, idx, N, D, float(lam), 1.0 - float(lam),
                *xn.stride(), *imp.stride(), picks.stride(0), *sim_max.stride(), *taken.stride(), *ostr,
                BLOCK_N=bn, BLOCK_D=bd,
            )
            am.finish(t)
    return picks


def greedy_coverage_triton(
    cov: torch.Tensor, k: int, valid: torch.Tensor | None = None, *, block_n: int | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Triton :func:`~vtprune.kernels.greedy.greedy_coverage`: k fused launches."""
    valid = _check_coverage(cov, k, valid)
    check_launchable(cov.device, INTERPRETED)
    S, M, N = cov.shape
    picks = torch.empty(S, k, dtype=torch.long, device=cov.device)
    if k == 0 or S == 0:
        return picks
    taken = (~valid).to(torch.uint8)  # (S, N) excluded or selected
    best = torch.zeros(2, S, M, device=cov.device)  # ping-pong: step t reads best[t % 2], writes the other
    if _compiled(cov):
        bm, bn = block(M, lo=16, hi=64), block(N, lo=16, hi=64)
    else:
        bm, bn = block(M, lo=16, hi=256), block(N, lo=16, hi=1024)
    bm, bn = block_m or bm, block_n or bn
    am = _Argmax(picks, triton.cdiv(N, bn))
    with device_context(cov.device):
        for t in range(k):
            val, idx, ostr = am.outputs(t)
            prev = picks[:, t - 1] if t else picks[:, 0]  # unused at t = 0 (HAS_PREV=False)
            _coverage_step_kernel[(S, am.n_blocks)](
                cov, prev, best[t % 2], best[(t + 1) % 2], taken, val, idx, M, N,
                *cov.stride(), picks.stride(0),
                *best[0].stride(), *taken.stride(), *ostr,
                HAS_PREV=t > 0, BLOCK_M=bm, BLOCK_N=bn,
            )
            am.finish(t)
    return picks
