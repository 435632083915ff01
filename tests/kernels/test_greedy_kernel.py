"""Greedy selection (k-center, MMR, coverage): Triton picks must equal the torch twin's exactly.

Random float32 inputs have no exact ties, so any difference is a bug, not rounding; the tie tests use
inputs whose scores are exactly equal (one-hot rows, fully covered rows) to pin the smallest-index rule.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from vtprune.kernels import (  # noqa: E402
    greedy_coverage,
    greedy_coverage_ref,
    greedy_kcenter,
    greedy_kcenter_ref,
    greedy_mmr,
    greedy_mmr_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 16, 8), (3, 77, 129)]  # (S, N, D)


def budgets(n: int) -> list[int]:
    """k = 1, a few, and k = n (every token; only for small n: interpreted steps cost ~20 ms each)."""
    return sorted({1, min(10, n)} | ({n} if n <= 20 else set()))


def mmr_dense(x: torch.Tensor, importance: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """IDPruner written the direct way, with the full similarity matrix (an independent check of the ref)."""
    xn = F.normalize(x.float(), dim=-1)
    sim = xn @ xn.transpose(1, 2)  # (S, N, N)
    out = []
    for s in range(x.shape[0]):
        chosen: list[int] = []
        m = torch.full((x.shape[1],), -2.0, device=x.device)
        for t in range(k):
            score = importance[s].float().clone() if t == 0 else lam * importance[s].float() - (1 - lam) * m
            score[chosen] = float("-inf")
            j = int(score.argmax())
            chosen.append(j)
            m = torch.maximum(m, sim[s, j])
        out.append(chosen)
    return torch.tensor(out, dtype=torch.long, device=x.device).reshape(x.shape[0], k)


# ----------------------------------------------------------------------------------------------- k-center


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,N,D", SHAPES)
def test_kcenter_matches_ref(S, N, D, dtype):
    x = torch.randn(S, N, D, device=DEVICE).to(dtype)
    first = torch.randint(0, N, (S,), device=DEVICE)
    for k in budgets(N):
        picks = greedy_kcenter(x, k, first, backend="triton")
        assert torch.equal(picks, greedy_kcenter_ref(x, k, first)), k
        assert picks.shape == (S, k) and torch.equal(picks[:, 0], first)
        if k == N:  # every token exactly once
            assert torch.equal(picks.sort(1).values, torch.arange(N, device=DEVICE).expand(S, N))


def test_kcenter_ref_equals_dense_farthest_point():
    """The streaming twin makes the same picks as the textbook O(k^2 N) loop over an N x N distance matrix."""
    from vtprune.methods.kcenter import cosine_distance

    x = torch.randn(3, 77, 129, device=DEVICE)
    first = torch.randint(0, 77, (3,), device=DEVICE)
    dist = cosine_distance(x)
    for s in range(3):
        picks = [int(first[s])]
        for _ in range(29):
            score = dist[s][picks].min(0).values  # distance to the nearest selected token
            score[picks] = -float("inf")
            picks.append(int(score.argmax()))
        assert greedy_kcenter_ref(x, 30, first)[s].tolist() == picks


def test_kcenter_multi_block_and_non_contiguous():
    from vtprune.kernels.greedy_triton import greedy_kcenter_triton

    S, N, D = 2, 77, 129
    x = torch.randn(S, D, N, device=DEVICE).transpose(1, 2)  # (S, N, D) non-contiguous
    first = torch.tensor([0, 76], device=DEVICE)
    assert torch.equal(greedy_kcenter_triton(x, 20, first, block_n=16), greedy_kcenter_ref(x, 20, first))


def test_kcenter_ties_take_smallest_index():
    x = torch.eye(16, device=DEVICE)[None]  # one-hot rows: every distance to the set is exactly 1
    picks = greedy_kcenter(x, 16, torch.tensor([5], device=DEVICE), backend="triton")
    assert picks.tolist() == [[5, 0, 1, 2, 3, 4, *range(6, 16)]]
    assert torch.equal(picks, greedy_kcenter_ref(x, 16, torch.tensor([5], device=DEVICE)))


# ---------------------------------------------------------------------------------------------------- MMR


@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("S,N,D", SHAPES)
def test_mmr_matches_ref(S, N, D, lam):
    x = torch.randn(S, N, D, device=DEVICE)
    importance = torch.rand(S, N, device=DEVICE)
    for k in budgets(N):
        picks = greedy_mmr(x, importance, k, lam, backend="triton")
        assert torch.equal(picks, greedy_mmr_ref(x, importance, k, lam)), k
    k = min(10, N)
    assert torch.equal(greedy_mmr_ref(x, importance, k, lam), mmr_dense(x, importance, k, lam))


def test_mmr_bf16_multi_block_and_ties():
    from vtprune.kernels.greedy_triton import greedy_mmr_triton

    x = torch.randn(2, 77, 48, device=DEVICE, dtype=torch.bfloat16)
    importance = torch.rand(2, 77, device=DEVICE, dtype=torch.bfloat16)  # many exact ties in bf16
    picks = greedy_mmr_triton(x, importance, 25, 0.7, block_n=16)
    assert torch.equal(picks, greedy_mmr_ref(x, importance, 25, 0.7))
    onehot = torch.eye(16, device=DEVICE)[None]
    flat = torch.ones(1, 16, device=DEVICE)
    assert greedy_mmr(onehot, flat, 16, backend="triton").tolist() == [list(range(16))]


# ----------------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S,M,N", [(1, 8, 16), (3, 50, 77)])
def test_coverage_matches_ref(S, M, N, dtype):
    cov = torch.rand(S, M, N, device=DEVICE).to(dtype)
    valid = torch.rand(S, N, device=DEVICE) > 0.3
    valid[:, 0] = True
    n_valid = int(valid.sum(1).min())
    for k in budgets(n_valid):  # k = n_valid: the late steps are all-zero-gain ties
        picks = greedy_coverage(cov, k, valid, backend="triton")
        assert torch.equal(picks, greedy_coverage_ref(cov, k, valid)), k
        assert valid.gather(1, picks).all()
        assert all(len(set(row)) == k for row in picks.tolist())
    if N <= 20:  # valid=None, k = N: every column, each once
        assert torch.equal(greedy_coverage(cov, N, backend="triton"), greedy_coverage_ref(cov, N))


def test_coverage_multi_block_non_contiguous():
    from vtprune.kernels.greedy_triton import greedy_coverage_triton

    cov = torch.rand(2, 77, 50, device=DEVICE).transpose(1, 2)  # (S, M=50, N=77), column-major
    valid = torch.rand(2, 77, device=DEVICE) > 0.2
    picks = greedy_coverage_triton(cov, 12, valid, block_n=16, block_m=16)
    assert torch.equal(picks, greedy_coverage_ref(cov, 12, valid))


def test_coverage_semantics():
    # Column 2 covers everything best; then column 0 adds the most on the rows column 2 misses.
    cov = torch.tensor([[[0.1, 0.0, 0.9, 0.2],
                         [0.8, 0.0, 0.5, 0.1],
                         [0.0, 0.3, 0.6, 0.0]]], device=DEVICE)
    assert greedy_coverage(cov, 2, backend="triton").tolist() == [[2, 0]]
    valid = torch.tensor([[True, True, False, True]], device=DEVICE)
    assert greedy_coverage(cov, 3, valid, backend="triton").tolist() == [[0, 1, 3]]


def test_guards():
    cov = torch.rand(2, 5, 6, device=DEVICE)
    valid = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    valid[1, :3] = False
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"k=4 exceeds the number of valid columns \(3"):
            greedy_coverage(cov, 4, valid, backend=backend)
        with pytest.raises(ValueError, match="k=7"):
            greedy_kcenter(cov, 7, torch.zeros(2, dtype=torch.long, device=DEVICE), backend=backend)
        bad = cov.clone()
        bad[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            greedy_mmr(bad, torch.rand(2, 5, device=DEVICE), 2, backend=backend)
        first = torch.zeros(2, dtype=torch.long, device=DEVICE)
        assert greedy_kcenter(cov, 0, first, backend=backend).shape == (2, 0)
        assert greedy_coverage(cov, 0, valid, backend=backend).shape == (2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (compiled path)")
def test_compiled_on_gpu():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    S, N, D = 4, 576, 4096  # LLaVA-1.5 projected tokens
    x = torch.randn(S, N, D, device="cuda", dtype=torch.bfloat16)
    first = torch.randint(0, N, (S,), device="cuda")
    assert torch.equal(greedy_kcenter(x, 64, first), greedy_kcenter_ref(x, 64, first))
    imp = torch.rand(S, N, device="cuda")
    assert torch.equal(greedy_mmr(x, imp, 64), greedy_mmr_ref(x, imp, 64))
    cov = torch.rand(S, 620, N, device="cuda")
    assert torch.equal(greedy_coverage(cov, 64), greedy_coverage_ref(cov, 64))
