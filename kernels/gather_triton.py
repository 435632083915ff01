"""Triton half of :mod:`vtprune.kernels.gather`. Imported only when the Triton backend is first used.

One kernel serves both layouts. A program copies a (BLOCK_K kept rows) x (BLOCK_D features) tile; the
programs of the first feature block also write those rows' position ids (all R M-RoPE rows) and mask, so
the hidden states, positions and mask come out of a single launch that reads each kept row once.
The op is a pure copy, i.e. memory-bound: the goal on a GPU is >= 80 % of DRAM bandwidth for the
hidden-state traffic (read + write of B * L' * D elements); on CUDA the tile shape is autotuned per
(D, dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import block, check_launchable, device_context, interpreting
from .gather import GatherOutput, VarlenOutput, _prepare, varlen_layout

INTERPRETED = interpreting()  # the mode the kernels below are decorated in


@triton.jit
def _gather_sequence_kernel(
    hidden_ptr, index_ptr, valid_ptr, pos_ptr, mask_ptr, dest_ptr,  # inputs
    out_ptr, pos_out_ptr, mask_out_ptr,  # outputs
    n_keep, D, R,
    s_hb, s_hl, s_hd,  # hidden (B, L, D)
    s_ib, s_ik, s_vb, s_vk,  # index, valid (B, L')
    s_pr, s_pb, s_pl,  # positions (R, B, L)
    s_mb, s_ml,  # mask (B, L)
    s_db, s_dk,  # dest (B, L'): packed output row of each slot (PACKED only)
    s_ob, s_ok, s_od,  # out (B, L', D), or (T, D) with s_ob unused
    s_por, s_pob, s_pok,  # positions out (R, B, L') or (R, T)
    s_mob, s_mok,  # mask out (B, L')
    HAS_POS: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_MASK: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # kept slots
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_k = offs_k < n_keep
    in_d = offs_d < D
    # int64 throughout: B * L * D overflows int32 for long videos.
    src = tl.load(index_ptr + b * s_ib + offs_k * s_ik, mask=in_k, other=0).to(tl.int64)  # (BLOCK_K,)
    keep = tl.load(valid_ptr + b * s_vb + offs_k * s_vk, mask=in_k, other=0) != 0
    if PACKED:  # only valid slots exist in the packed layout
        row = tl.load(dest_ptr + b * s_db + offs_k * s_dk, mask=in_k & keep, other=0).to(tl.int64)
        out_row = row * s_ok
        pos_row = row * s_pok
        live = in_k & keep
    else:
        out_row = b * s_ob + offs_k.to(tl.int64) * s_ok
        pos_row = b * s_pob + offs_k.to(tl.int64) * s_pok
        live = in_k
    tile = live[:, None] & in_d[None, :]
    x = tl.load(hidden_ptr + b * s_hb + src[:, None] * s_hl + offs_d[None, :] * s_hd, mask=tile)
    tl.store(out_ptr + out_row[:, None] + offs_d[None, :] * s_od, x, mask=tile)

    if tl.program_id(2) == 0:  # per-row metadata, once per kept row
        if HAS_POS:
            for r in range(R):
                p = tl.load(pos_ptr + r * s_pr + b * s_pb + src * s_pl, mask=live)
                tl.store(pos_out_ptr + r * s_por + pos_row, p, mask=live)
        if WRITE_MASK:
            if HAS_MASK:
                m = tl.load(mask_ptr + b * s_mb + src * s_ml, mask=in_k, other=0)
                m = tl.where(keep, m, tl.zeros_like(m))
            else:
                m = keep.to(tl.int64)
            tl.store(mask_out_ptr + b * s_mob + offs_k * s_mok, m, mask=in_k)


# Bandwidth-bound copy: each program moves 4-32 KB; the best tile depends on D and the element size.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w)
    for bk, bd, w in [(1, 2048, 8), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8),
                      (32, 128, 4)]
]
# Only on a real GPU: autotuning benchmarks the configs, which needs a driver (and is meaningless when
# interpreted). Keyed on D and PACKED; the autotuner adds the tensors' dtypes to the key itself.
_gather_sequence_tuned = triton.autotune(_GPU_CONFIGS, key=["D", "PACKED"])(_gather_sequence_kernel)


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """bool -> uint8 view (zero-copy) so the kernel does plain integer loads and stores."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _launch(
    hidden: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    pos: torch.Tensor | None,
    mask: torch.Tensor | None,
    dest: torch.Tensor | None,
    out: torch.Tensor,
    pos_out: torch.Tensor | None,
    mask_out: torch.Tensor | None,
    blocks: tuple[int, int] | None,
) -> None:
    B, n_keep = index.shape
    D = hidden.shape[2]
    check_launchable(hidden.device, INTERPRETED)
    if B == 0 or n_keep == 0:
        return
    packed = dest is not None
    dummy = index  # never dereferenced: the matching constexpr flag is off
    out_ob = 0 if packed else out.stride(0)
    out_ok, out_od = (out.stride(0), out.stride(1)) if packed else (out.stride(1), out.stride(2))
    if pos_out is None:
        po = (0, 0, 0)
    elif packed:
        po = (pos_out.stride(0), 0, pos_out.stride(1))  # (R, T)
    else:
        po = pos_out.stride()  # (R, B, L')
    args = (
        hidden, index, _as_int(valid), pos if pos is not None else dummy,
        _as_int(mask) if mask is not None else dummy, dest if packed else dummy,
        out, pos_out if pos_out is not None else dummy, _as_int(mask_out) if mask_out is not None else dummy,
        n_keep, D, pos.shape[0] if pos is not None else 0,
        *hidden.stride(), *index.stride(), *valid.stride(),
        *(pos.stride() if pos is not None else (0, 0, 0)),
        *(mask.stride() if mask is not None else (0, 0)),
        *(dest.stride() if packed else (0, 0)),
        out_ob, out_ok, out_od, *po,
        *(mask_out.stride() if mask_out is not None else (0, 0)),
    )
    flags = dict(HAS_POS=pos is not None, HAS_MASK=mask is not None, WRITE_MASK=mask_out is not None,
                 PACKED=packed)
    with device_context(hidden.device):
        if hidden.is_cuda and not INTERPRETED and blocks is None:
            grid = lambda meta: (B, triton.cdiv(n_keep, meta["BLOCK_K"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
            _gather_sequence_tuned[grid](*args, **flags)
        else:
            # Interpreter: every program runs serially in numpy (~2-3 ms each), so take few, large tiles.
            bk, bd = blocks or (block(n_keep, hi=128), block(D, lo=16, hi=4096))
            grid = (B, triton.cdiv(n_keep, bk), triton.cdiv(D, bd))
            _gather_sequence_kernel[grid](*args, **flags, BLOCK_K=bk, BLOCK_D=bd)


def gather_sequence_triton(
    hidden: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    blocks: tuple[int, int] | None = None,
) -> GatherOutput:
    """Triton :func:`~vtprune.kernels.gather.gather_sequence`: one launch for hidden, positions and mask.

    ``blocks=(BLOCK_K, BLOCK_D)`` fixes the tile (tests, tuning); by default it is autotuned on CUDA.
    """
    squeeze = position_ids is not None and position_ids.dim() == 2
    index, valid, pos, mask = _prepare(hidden, index, valid, position_ids, attention_mask)
    B, n_keep = index.shape
    out = hidden.new_empty(B, n_keep, hidden.shape[2])  # (B, L', D)
    pos_out = None if pos is None else pos.new_empty(pos.shape[0], B, n_keep)  # (R, B, L')
    mask_out = torch.empty(B, n_keep, dtype=mask.dtype if mask is not None else torch.long,
                           device=hidden.device)  # (B, L')
    _launch(hidden, index, valid, pos, mask, None, out, pos_out, mask_out, blocks)
    if pos_out is not None and squeeze:
        pos_out = pos_out[0]
    return GatherOutput(out, pos_out, mask_out)


def pack_varlen_triton(
    hidden: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    blocks: tuple[int, int] | None = None,
) -> VarlenOutput:
    """Triton :func:`~vtprune.kernels.gather.pack_varlen`: the same kernel, storing slot (b, j) at packed
    row ``cu_seqlens[b] + (number of valid slots before j)`` (a cumsum in torch) and skipping padding."""
    squeeze = position_ids is not None and position_ids.dim() == 2
    index, valid, pos, _ = _prepare(hidden, index, valid, position_ids, None)
    cu, max_seqlen = varlen_layout(valid)
    T = int(cu[-1])
    dest = cu[:-1, None].long() + valid.long().cumsum(1) - 1  # (B, L') packed row of each valid slot
    out = hidden.new_empty(T, hidden.shape[2])  # (T, D)
    pos_out = None if pos is None else pos.new_empty(pos.shape[0], T)  # (R, T)
    _launch(hidden, index, valid, pos, None, dest, out, pos_out, None, blocks)
    if pos_out is not None and squeeze:
        pos_out = pos_out[0]
    return VarlenOutput(out, cu, max_seqlen, pos_out)
