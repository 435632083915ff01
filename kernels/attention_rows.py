"""Attention-row scores: softmax(q · Kᵀ · scale) of a few query rows over all keys, without an L × L map.

This is the signal every attention-scored method reads (FastV's last-token row, text-to-visual attention,
the ViT CLS row), recomputed from one layer's q and k so the model can keep sdpa / flash attention
instead of being forced to eager attention to return full attention maps.

The Triton kernels (:mod:`vtprune.kernels.attention_rows_triton`) stream keys a block at a time in two
passes: per (b, h, query row) the running max and normaliser (online softmax), then the probabilities,
already averaged over query rows (and heads). The torch twin materialises (B, H, Tq, L) and is the definition.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._backend import load_triton_module, resolve_backend

Reduce = Literal["mean", "none"]


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor,
    query_pos: torch.Tensor | None,
    query_weight: torch.Tensor | None,
    reduce: str,
) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q must be (B, H, Tq, d) and k (B, Hkv, L, d); got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    B, H, Tq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch and head dim)")
    Hkv, L = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads Hkv={Hkv} (GQA)")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype; got {q.dtype} and {k.dtype}")
    if key_valid.shape != (B, L):
        raise ValueError(f"key_valid must be (B={B}, L={L}); got {tuple(key_valid.shape)}")
    for name, t in (("query_pos", query_pos), ("query_weight", query_weight)):
        if t is not None and t.shape != (B, Tq):
            raise ValueError(f"{name} must be (B={B}, Tq={Tq}); got {tuple(t.shape)}")
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce={reduce!r} must be 'mean' or 'none'")


def normalized_query_weights(query_weight: torch.Tensor | None, B: int, Tq: int, device: torch.device,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, Tq) weights summing to 1 per row (uniform if None; all zero if a row's weights are all zero)."""
    if query_weight is None:
        return torch.full((B, Tq), 1.0 / max(Tq, 1), dtype=dtype, device=device)
    w = query_weight.to(dtype)
    total = w.sum(1, keepdim=True)  # (B, 1)
    return torch.where(total > 0, w / torch.where(total > 0, total, 1), 0)


def attention_rows_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    key_valid: torch.Tensor,
    query_pos: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    reduce: Reduce = "mean",
    upcast: bool = True,
) -> torch.Tensor:
    """Pure-torch :func:`attention_rows`; materialises (B, H, Tq, L).

    ``upcast=False`` computes everything in the input dtype instead of float32 (flash-attention's
    ``attention_ref(upcast=False)``): the error of that plain low-precision computation is what the tests
    allow the kernel twice of.
    """
    _check(q, k, key_valid, query_pos, query_weight, reduce)
    B, H, Tq, _ = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    dt = torch.float32 if upcast else q.dtype
    # GQA without repeating K: query heads h = j * G + g (G = H // Hkv) all read kv head j.
    qg = q.to(dt).reshape(B, Hkv, (H // Hkv) * Tq, q.shape[-1])  # (B, Hkv, G * Tq, d)
    s = (qg @ k.to(dt).transpose(-1, -2)).view(B, H, Tq, L) * scale  # (B, H, Tq, L)
    allowed = key_valid.bool()[:, None, :].expand(B, Tq, L)  # (B, Tq, L)
    if query_pos is not None:  # causal: key j is visible to query t iff j <= query_pos[b, t]
        allowed = allowed & (torch.arange(L, device=q.device)[None, None, :] <= query_pos[:, :, None])
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = s.softmax(-1)  # (B, H, Tq, L); a row with no visible key gives NaN ...
    p = torch.where(allowed.any(-1)[:, None, :, None], p, 0)  # ... and contributes zeros instead
    w = normalized_query_weights(query_weight, B, Tq, q.device, dt)  # (B, Tq)
    out = (p * w[:, None, :, None]).sum(2)  # (B, H, L)
    return out.mean(1) if reduce == "mean" else out


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    key_valid: torch.Tensor,
    query_pos: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    reduce: Reduce = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Attention probabilities of a few query rows over all keys, averaged over the rows (and heads).

    Args:
        q: (B, H, Tq, d) query rows, already projected, normed and rotated.
        k: (B, Hkv, L, d) keys, same dtype; H % Hkv == 0 (GQA: query head h reads kv head h // (H // Hkv)).
        scale: logit scale, usually d ** -0.5.
        key_valid: (B, L) bool, False for padding / dropped keys.
        query_pos: (B, Tq) int64 or None. Causal: key j is visible to query t iff j <= query_pos[b, t].
        query_weight: (B, Tq) float weights over query rows (None = uniform; rows of weight 0 are ignored);
            normalised to sum to 1 per batch row.
        reduce: "mean" over heads -> (B, L), or "none" -> (B, H, L).

    Returns:
        float32 (B, L) or (B, H, L): softmax over the visible keys in float32, weighted-averaged over query
        rows. A query row with no visible key contributes zeros.
    """
    if resolve_backend(backend, q.device) == "torch":
        return attention_rows_ref(q, k, scale=scale, key_valid=key_valid, query_pos=query_pos,
                                  query_weight=query_weight, reduce=reduce)
    return load_triton_module("attention_rows_triton").attention_rows_triton(
        q, k, scale=scale, key_valid=key_valid, query_pos=query_pos, query_weight=query_weight, reduce=reduce
    )
