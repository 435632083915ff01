"""Sequence surgery shared by the engine: gathering rows, positions and attention masks of a pruned
sequence, building masks for padding slots, compact positions and rotate-half RoPE. Pure tensor code."""

from __future__ import annotations

from typing import Any

import torch

from vtprune.kernels import gather_sequence


def take(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather ``x`` along ``dim`` with a (B, L') index broadcast over the trailing dims (and over a
    batch dim of 1, as in the (1, L, d) rotary tables of an unpadded batch)."""
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    index = index.to(x.device)  # layers of a device_map split live on different devices
    shape = list(index.shape) + [1] * (x.dim() - dim - 1)
    idx = index.reshape(shape).expand(*index.shape, *x.shape[dim + 1 :])
    return x.gather(dim, idx)


def take_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids of shape (B, L) or (R, B, L) (M-RoPE rows) with a (B, L') index."""
    index = index.to(pos.device)
    if pos.dim() == 2:
        return pos.expand(index.shape[0], -1).gather(1, index)
    return pos.gather(2, index.unsqueeze(0).expand(pos.shape[0], -1, -1))


def _masked_value(mask: torch.Tensor) -> Any:
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def take_mask(
    mask: torch.Tensor, kv_index: torch.Tensor, kv_valid: torch.Tensor, q_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Cut an attention mask down to the kept keys (and queries).

    ``mask`` is a 2-D (B, KV) padding mask or a 4-D (B, 1|H, Q, KV) boolean / additive mask;
    ``kv_index`` (B, KV') selects keys, ``kv_valid`` (B, KV') masks padding slots, ``q_index`` (B, Q')
    selects query rows of a 4-D mask.
    """
    kv_index, kv_valid = kv_index.to(mask.device), kv_valid.to(mask.device)
    q_index = None if q_index is None else q_index.to(mask.device)
    if mask.dim() == 2:
        out = mask.gather(1, kv_index)
        return out.masked_fill(~kv_valid, 0)
    if q_index is not None and mask.shape[2] != 1:
        mask = mask.gather(2, q_index[:, None, :, None].expand(mask.shape[0], mask.shape[1], -1, mask.shape[3]))
    out = mask.gather(3, kv_index[:, None, None, :].expand(mask.shape[0], mask.shape[1], mask.shape[2], -1))
    return out.masked_fill(~kv_valid[:, None, None, :], _masked_value(mask))


def build_mask(impl: str, kv_valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """A mask in ``impl``'s format for the last ``q_len`` slots attending causally over ``kv_valid``."""
    if impl.startswith("flash") or impl == "paged_attention":
        return kv_valid.long()
    B, KV = kv_valid.shape
    q_abs = torch.arange(KV - q_len, KV, device=kv_valid.device)  # (q,) kv index of each query
    causal = torch.arange(KV, device=kv_valid.device)[None, :] <= q_abs[:, None]  # (q, KV)
    allowed = causal[None, None] & kv_valid[:, None, None, :]  # (B, 1, q, KV)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=kv_valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def compact_positions(pos: torch.Tensor, attend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-index 1-D positions (B, L') contiguously over attended slots; returns (positions, shift (B,)).
    ``shift`` = old - new position of each row's last attended slot (what decode steps subtract)."""
    first = torch.where(attend, pos, torch.iinfo(pos.dtype).max).min(dim=1).values  # (B,)
    first = torch.where(attend.any(1), first, torch.zeros_like(first))
    rank = attend.long().cumsum(1) - 1  # (B, L')
    new = torch.where(attend, first[:, None] + rank, first[:, None])
    last = (attend.long() * torch.arange(1, pos.shape[1] + 1, device=pos.device)).argmax(1)  # last attended slot
    shift = pos.gather(1, last[:, None])[:, 0] - new.gather(1, last[:, None])[:, 0]
    return new, shift


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d) with cos/sin (B, T, r): the rotate-half RoPE every supported LLM uses, on the first r <= d
    dimensions (partial rotary, as Qwen3.5's); the rest pass through."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]
    rot = x[..., :r]
    return torch.cat([rot * cos[:, None] + _rotate_half(rot) * sin[:, None], x[..., r:]], dim=-1)


def kept_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> (order (B, L'), valid (B, L')): the kept slots of every row in order, rows left-padded
    with dropped ones (valid False) to the longest row (a stable sort puts False first)."""
    new_len = int(keep.sum(1).max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - new_len :]
    return order, keep.gather(1, order)


def cut_llm_input(embeds: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, mask0: torch.Tensor,
                  positions: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
    """The 2-D language-model inputs of the kept tokens, in one fused gather (vtprune.kernels): embeddings
    (B, L0, D), the padding mask (B, L0) in the caller's dtype (int64 when the caller gave none) and position ids
    (B, L0) or (R, B, L0)."""
    out = gather_sequence(embeds, index, valid, position_ids=positions, attention_mask=mask0)
    return {"inputs_embeds": out.hidden, "position_ids": out.position_ids,
            "attention_mask": out.attention_mask if mask is None else out.attention_mask.to(mask.dtype)}


def decode_mask(mask: torch.Tensor | None, base_mask: torch.Tensor, orig_len: int, has_pads: bool,
                new_tokens: int) -> torch.Tensor | None:
    """The 2-D mask of a decode step over the pruned cache: the kept prefix's mask, then the caller's mask of
    the tokens after the prompt (``mask`` is the full-length mask generate() keeps; None without padding)."""
    if mask is not None:
        if mask.dim() != 2 or mask.shape[1] < orig_len:
            raise NotImplementedError(
                f"decode step got an attention_mask of shape {tuple(mask.shape)}; vtprune expects the 2-D mask of the "
                f"full (unpruned) sequence, at least {orig_len} long")
        return torch.cat([base_mask.to(mask.dtype), mask[:, orig_len:]], dim=1)
    if has_pads:
        ones = torch.ones(base_mask.shape[0], new_tokens, dtype=base_mask.dtype, device=base_mask.device)
        return torch.cat([base_mask, ones], dim=1)
    return None
