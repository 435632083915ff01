"""Triton half of :mod:`vtprune.kernels.attention_rows`. Imported only when the Triton backend is first used.

Two streaming passes over the keys; nothing larger than a (BLOCK_T, BLOCK_L) score tile ever exists:

1. ``_attention_rows_stats_kernel``, a program per (b, h, block of query rows): online softmax over key
   blocks -> running max m and normaliser per row; stores m and c = weight / normaliser (0 for rows of
   weight 0 or with no visible key), so pass 2 needs one multiply per probability.
2. ``_attention_rows_probs_kernel``, a program per (b, block of keys, h): recomputes the score tile and
   accumulates sum_t c_t * exp(s_t - m_t) over query rows (the interpreter also sums the heads of
   reduce="mean" in-program; a GPU uses a program per head and a torch mean, for parallelism).

Recomputing q·kᵀ in pass 2 costs a second read of K (Tq is small, so the op is bound by reading K) and
saves writing and reading a (B, H, Tq, L) probability tensor. Logits are accumulated in float32 (``ieee``
precision for float32 inputs: TF32 would cost ~1e-3 relative error on the logits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import block, check_launchable, device_context, interpreting, next_pow2
from .attention_rows import _check, normalized_query_weights

INTERPRETED = interpreting()  # the mode the kernels below are decorated in


@triton.jit
def _scores(q, k, scale, UPCAST: tl.constexpr):
    """(BLOCK_T, BLOCK_D) x (BLOCK_L, BLOCK_D) -> (BLOCK_T, BLOCK_L) float32 logits q·kᵀ·scale."""
    if UPCAST or q.dtype == tl.float32:
        # fp32 inputs: "ieee", not TF32 (~1e-3 relative error on the logits). UPCAST: Triton 3.9's
        # interpreter multiplies the raw bit patterns in a bf16 tl.dot, so interpreted tiles go through fp32.
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
    # 16-bit inputs on a GPU: exact products accumulated in fp32, as accurate as upcasting.
    return tl.dot(q, tl.trans(k)) * scale


@triton.jit
def _attention_rows_stats_kernel(
    q_ptr, k_ptr, kvalid_ptr, qpos_ptr, w_ptr, m_ptr, c_ptr,
    H, Tq, L, d, group, scale,
    s_qb, s_qh, s_qt, s_qd,  # q (B, H, Tq, d)
    s_kb, s_kh, s_kl, s_kd,  # k (B, Hkv, L, d)
    s_vb, s_vl,  # key_valid (B, L)
    s_pb, s_pt,  # query_pos (B, Tq)
    s_wb, s_wt,  # normalised weights (B, Tq)
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kh = (h // group).to(tl.int64)  # GQA: the kv head this query head reads
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    in_t = offs_t < Tq
    in_d = offs_d < d
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_t[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=in_t[:, None] & in_d[None, :], other=0.0)  # (BLOCK_T, BLOCK_D)
    if CAUSAL:
        qpos = tl.load(qpos_ptr + b * s_pb + offs_t * s_pt, mask=in_t, other=-1)  # (BLOCK_T,)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    norm = tl.zeros((BLOCK_T,), tl.float32)  # softmax denominator relative to m
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_l = offs_l < L
        k_rows = k_ptr + b * s_kb + kh * s_kh + offs_l[:, None].to(tl.int64) * s_kl  # (BLOCK_L, 1) row starts
        k = tl.load(k_rows + offs_d[None, :] * s_kd, mask=in_l[:, None] & in_d[None, :], other=0.0)
        s = _scores(q, k, scale, UPCAST)  # (BLOCK_T, BLOCK_L) fp32
        ok = (tl.load(kvalid_ptr + b * s_vb + offs_l * s_vl, mask=in_l, other=0) != 0)[None, :]
        if CAUSAL:
            ok = ok & (offs_l[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: avoid -inf - -inf
        norm = norm * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    w = tl.load(w_ptr + b * s_wb + offs_t * s_wt, mask=in_t, other=0.0)
    c = tl.where(norm > 0, w / tl.where(norm > 0, norm, 1.0), 0.0)
    out = pid_bh.to(tl.int64) * Tq + offs_t  # m, c are contiguous (B, H, Tq)
    tl.store(m_ptr + out, tl.where(m == float("-inf"), 0.0, m), mask=in_t)  # finite: no NaN in pass 2
    tl.store(c_ptr + out, c, mask=in_t)


@triton.jit
def _attention_rows_probs_kernel(
    q_ptr, k_ptr, kvalid_ptr, qpos_ptr, m_ptr, c_ptr, out_ptr,
    H, Tq, L, d, group, scale, heads_per_prog,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vl,
    s_pb, s_pt,
    s_ob, s_oh, s_ol,  # out (B, H or 1, L) float32
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    hp = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    in_l = offs_l < L
    in_d = offs_d < d
    visible = tl.load(kvalid_ptr + b * s_vb + offs_l * s_vl, mask=in_l, other=0) != 0  # (BLOCK_L,)
    acc = tl.zeros((BLOCK_L,), tl.float32)
    for i in range(heads_per_prog):
        h = hp * heads_per_prog + i
        kh = (h // group).to(tl.int64)
        k_rows = k_ptr + b * s_kb + kh * s_kh + offs_l[:, None].to(tl.int64) * s_kl  # (BLOCK_L, 1) row starts
        k = tl.load(k_rows + offs_d[None, :] * s_kd, mask=in_l[:, None] & in_d[None, :], other=0.0)
        for t0 in range(0, Tq, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            in_t = offs_t < Tq
            q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_t[:, None] * s_qt + offs_d[None, :] * s_qd,
                        mask=in_t[:, None] & in_d[None, :], other=0.0)  # (BLOCK_T, BLOCK_D)
            row = (b * H + h) * Tq + offs_t
            m = tl.load(m_ptr + row, mask=in_t, other=0.0)
            c = tl.load(c_ptr + row, mask=in_t, other=0.0)  # 0 on padding rows: they add nothing
            s = _scores(q, k, scale, UPCAST)  # (BLOCK_T, BLOCK_L)
            ok = visible[None, :] & in_t[:, None]
            if CAUSAL:
                qpos = tl.load(qpos_ptr + b * s_pb + offs_t * s_pt, mask=in_t, other=-1)
                ok = ok & (offs_l[None, :] <= qpos[:, None])
            p = tl.exp(tl.where(ok, s, float("-inf")) - m[:, None])  # hidden keys -> exactly 0
            acc += tl.sum(p * c[:, None], 0)
    acc = acc / heads_per_prog
    tl.store(out_ptr + b * s_ob + hp * s_oh + offs_l * s_ol, acc, mask=in_l)


def attention_rows_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    key_valid: torch.Tensor,
    query_pos: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    reduce: str = "mean",
    block_t: int | None = None,
    block_l: int | None = None,
) -> torch.Tensor:
    """Triton :func:`~vtprune.kernels.attention_rows.attention_rows` (two launches, see the module doc).

    ``block_t`` / ``block_l`` fix the query / key tile (powers of two >= 16; for tests and tuning).
    """
    _check(q, k, key_valid, query_pos, query_weight, reduce)
    check_launchable(q.device, INTERPRETED)
    B, H, Tq, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if B == 0 or L == 0 or Tq == 0 or H == 0:
        out = torch.zeros(B, H, L, dtype=torch.float32, device=q.device)
        return out if reduce == "none" else out.mean(1)
    w = normalized_query_weights(query_weight, B, Tq, q.device).contiguous()  # (B, Tq)
    kvalid = key_valid.bool().view(torch.uint8)
    qpos = query_pos if query_pos is not None else w  # dummy pointer when not causal
    m = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)  # running max per row
    c = torch.empty_like(m)  # weight / normaliser per row
    interp = INTERPRETED or not q.is_cuda
    # tl.dot needs every dim >= 16; d is one tile (head dims are <= 256). Interpreted programs run serially
    # at ~2-3 ms each, so there the key block covers (nearly) the whole sequence.
    bt = block_t or block(Tq, lo=16, hi=64)
    bd = max(16, next_pow2(d))
    bl = block_l or (block(L, lo=16, hi=1024) if interp else (64 if bd <= 128 else 32))
    warps = 4 if bd <= 128 else 8
    common = dict(CAUSAL=query_pos is not None, UPCAST=interp,
                  BLOCK_T=bt, BLOCK_L=bl, BLOCK_D=bd)
    strides = (*q.stride(), *k.stride(), *kvalid.stride(),
               *(query_pos.stride() if query_pos is not None else (0, 0)))
    # reduce="mean": on a GPU, a program per head (B * H * L / BLOCK_L programs fill the device; B = 1 and
    # L = 620 would leave all but 10 SMs idle otherwise) and a torch mean over the (B, H, L) result; in the
    # interpreter, one program sums all heads of its key block.
    heads_per_prog = H if reduce == "mean" and interp else 1
    out = torch.empty(B, H // heads_per_prog, L, dtype=torch.float32, device=q.device)  # (B, H | 1, L)
    with device_context(q.device):
        _attention_rows_stats_kernel[(B * H, triton.cdiv(Tq, bt))](
            q, k, kvalid, qpos, w, m, c, H, Tq, L, d, H // Hkv, scale, *strides, *w.stride(),
            **common, num_warps=warps,
        )
        _attention_rows_probs_kernel[(B, triton.cdiv(L, bl), H // heads_per_prog)](
            q, k, kvalid, qpos, m, c, out, H, Tq, L, d, H // Hkv, scale, heads_per_prog,
            *strides, *out.stride(),
            **common, num_warps=warps,
        )
    if reduce == "none":
        return out
    return out[:, 0] if heads_per_prog == H else out.mean(1)
