"""Fused sequence gather: apply a keep-index to hidden states, position ids and the attention mask at once.

``gather_sequence`` keeps a padded (B, L') layout (ragged rows left-padded by the caller); ``pack_varlen``
writes only the valid slots, row after row, in the (T, D) + ``cu_seqlens`` layout that flash-attention's
variable-length path takes, so a ragged batch needs no padding at all.

The Triton kernel lives in :mod:`vtprune.kernels.gather_triton` (imported on first use); this module holds
the public dispatchers and the pure-torch twins, which are the definition of the ops.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backend import load_triton_module, resolve_backend


class GatherOutput(NamedTuple):
    hidden: torch.Tensor  # (B, L', D) hidden.gather(index), bit-exact copies
    position_ids: torch.Tensor | None  # (B, L') or (R, B, L'), dtype of the input; None if none given
    attention_mask: torch.Tensor  # (B, L') mask.gather(index) * valid, mask dtype (int64 if no mask given)


class VarlenOutput(NamedTuple):
    packed: torch.Tensor  # (T, D) valid slots only, row after row; T = valid.sum()
    cu_seqlens: torch.Tensor  # (B + 1,) int32, cumulative sequence lengths (flash-attn's varlen layout)
    max_seqlen: int  # longest row (0 for an empty batch)
    position_ids: torch.Tensor | None  # (T,) or (R, T)


def _prepare(
    hidden: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check shapes; return (index int64, valid bool, positions as (R, B, L) or None, mask (B, L) or None).

    A batch dim of 1 in positions or mask is broadcast to B (an expand: stride 0, no copy), as for the shared
    position ids of an unpadded batch.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, L, D); got shape {tuple(hidden.shape)}")
    B, L, _ = hidden.shape
    if index.dim() != 2 or index.shape[0] != B:
        raise ValueError(f"index must be (B={B}, L'); got shape {tuple(index.shape)}")
    if valid.shape != index.shape:
        raise ValueError(f"valid must match index {tuple(index.shape)}; got {tuple(valid.shape)}")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor; got {index.dtype}")
    pos = None
    if position_ids is not None:
        pos = position_ids if position_ids.dim() == 3 else position_ids.unsqueeze(0)  # (R, B|1, L)
        if pos.dim() != 3 or pos.shape[1] not in (1, B) or pos.shape[2] != L:
            raise ValueError(f"position_ids must be (B, L) or (R, B, L) with B={B}, L={L}; "
                             f"got {tuple(position_ids.shape)}")
        pos = pos.expand(pos.shape[0], B, L)
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] not in (1, B) or attention_mask.shape[1] != L:
            raise ValueError(
                f"attention_mask must be a 2-D (B={B}, L={L}) mask; got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.expand(B, L)
    return index.long(), valid.bool(), pos, mask


def _take_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, D) rows ``index`` (B, L') -> (B, L', D), or (T, D) for a flat (T,) index into B * L rows.

    ``index_select`` on the flattened rows is 5-15x faster than ``gather`` on CPU (measured for LLaVA
    shapes: 0.9 vs 13 ms in bf16) and bit-identical; ``gather`` serves inputs whose (B, L) dims cannot be
    flattened without a copy.
    """
    B, L, D = hidden.shape
    try:
        flat = hidden.view(B * L, D)  # (B * L, D)
    except RuntimeError:  # non-flattenable strides
        flat = None
    if index.dim() == 1:  # already flat
        if flat is None:
            return hidden.flatten(0, 1).index_select(0, index)
        return flat.index_select(0, index)
    if flat is None:
        return hidden.gather(1, index[:, :, None].expand(-1, -1, D))
    offsets = torch.arange(B, device=index.device)[:, None] * L  # (B, 1)
    return flat.index_select(0, (index + offsets).reshape(-1)).view(*index.shape, D)


def gather_sequence_ref(
    hidden: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> GatherOutput:
    """Pure-torch :func:`gather_sequence`."""
    squeeze = position_ids is not None and position_ids.dim() == 2
    index, valid, pos, mask = _prepare(hidden, index, valid, position_ids, attention_mask)
    out = _take_rows(hidden, index)  # (B, L', D)
    pos_out = None
    if pos is not None:
        pos_out = pos.gather(2, index[None].expand(pos.shape[0], -1, -1))  # (R, B, L')
        pos_out = pos_out[0] if squeeze else pos_out
    mask_out = mask.gather(1, index) * valid if mask is not None else valid.long()  # (B, L')
    return GatherOutput(out, pos_out, mask_out)


def gather_sequence(
    hidden: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> GatherOutput:
    """Keep rows ``index`` of every batch row of ``hidden``, with their position ids and mask, in one pass.

    Args:
        hidden: (B, L, D) any dtype, any strides.
        index: (B, L') int64 source rows per batch row, each in [0, L). Ragged rows are left-padded by the
            caller: padding slots carry ``valid=False`` and any in-range index.
        valid: (B, L') bool, False on padding slots.
        position_ids: None, (B, L) or (R, B, L) (Qwen's M-RoPE, R = 3 or 4); a batch dim of 1 broadcasts.
        attention_mask: None or a 2-D (B, L) integer/bool padding mask.
        backend: "auto" | "torch" | "triton" (see :func:`vtprune.kernels.resolve_backend`).

    Returns:
        ``GatherOutput(hidden (B, L', D), position_ids (B, L') | (R, B, L') | None, attention_mask (B, L'))``:
        exact gathers; the mask is ``attention_mask.gather(index) * valid`` in the mask's dtype, or
        ``valid`` as int64 (the HF convention) when no mask is given. Differentiable in ``hidden``: an input
        that needs a gradient takes the torch twin (the Triton kernel has no backward).
    """
    if (hidden.requires_grad and torch.is_grad_enabled()) or resolve_backend(backend, hidden.device) == "torch":
        return gather_sequence_ref(hidden, index, valid, position_ids, attention_mask)
    return load_triton_module("gather_triton").gather_sequence_triton(
        hidden, index, valid, position_ids, attention_mask
    )


def varlen_layout(valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, L') bool -> (cu_seqlens (B + 1,) int32, max_seqlen); synchronises once (flash-attn wants an int).
    """
    counts = valid.sum(1)  # (B,)
    cu = torch.zeros(valid.shape[0] + 1, dtype=torch.int32, device=valid.device)
    cu[1:] = counts.cumsum(0)
    return cu, int(counts.max()) if counts.numel() else 0


def pack_varlen_ref(
    hidden: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> VarlenOutput:
    """Pure-torch :func:`pack_varlen`."""
    squeeze = position_ids is not None and position_ids.dim() == 2
    index, valid, pos, _ = _prepare(hidden, index, valid, position_ids, None)
    cu, max_seqlen = varlen_layout(valid)
    B, L, _ = hidden.shape
    flat = (index + torch.arange(B, device=index.device)[:, None] * L)[valid]  # (T,) rows of (B * L, D)
    packed = _take_rows(hidden, flat)  # (T, D)
    if pos is not None:
        pos = pos.gather(2, index[None].expand(pos.shape[0], -1, -1))[:, valid]  # (R, T)
        pos = pos[0] if squeeze else pos
    return VarlenOutput(packed, cu, max_seqlen, pos)


def pack_varlen(
    hidden: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> VarlenOutput:
    """Gather the valid kept rows of a ragged batch straight into flash-attention's varlen layout.

    Same inputs as :func:`gather_sequence` (without the mask: the layout itself says which slots exist).

    Returns:
        ``VarlenOutput(packed (T, D), cu_seqlens (B + 1,) int32, max_seqlen int, position_ids (T,) | (R, T) |
        None)`` with ``T = valid.sum()``: row b occupies ``packed[cu_seqlens[b]:cu_seqlens[b + 1]]`` in slot
        order. Ready for ``flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)``.
        Differentiable in ``hidden`` (through the torch twin), as :func:`gather_sequence`.
    """
    if (hidden.requires_grad and torch.is_grad_enabled()) or resolve_backend(backend, hidden.device) == "torch":
        return pack_varlen_ref(hidden, index, valid, position_ids)
    return load_triton_module("gather_triton").pack_varlen_triton(hidden, index, valid, position_ids)
