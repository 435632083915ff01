"""Positions of a pruned prompt in vLLM: kept tokens keep their original positions (the HF host's default).

vLLM lays out a prompt's positions when it processes it, before the encoder runs, so it knows how many
tokens each image keeps but not which. Both steps use vLLM's multimodal-pruning path (the one its EVS video
pruning uses), with vtprune's own rule:

* :func:`prompt_positions` (at prompt processing): text tokens get their final positions, exactly as without
  pruning (the text after an image starts at the image's start + its extent, the span its unpruned tokens
  cover: ``max(t, h, w) + 1`` for M-RoPE, as transformers' ``get_rope_index``; ``n`` for 1-D RoPE); every
  placeholder provisionally holds its image's start.
* :func:`recompute` (when the encoder's output reaches the prompt): each kept token's position is its image's
  start plus its own offset, which the encoder returns in extra columns of its embedding rows.

1-D RoPE families (LLaVA) get this path too: their rotary table is switched to M-RoPE with every frequency in
the first row (``mrope_section=[rotary_dim/2, 0, 0]``), which is plain RoPE on row 0; rows 1 and 2 of a
placeholder keep its image's start and end, so a partly computed image (chunked prefill) still finds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RADIX = 128  # each offset travels as (hi, lo) digits: exact in bfloat16 (integers to 256) up to 32767
COLUMNS = 6  # extra embedding columns carrying each kept token's (t, h, w) offset


def offset_columns(offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(k, 3) integer offsets -> (k, 6) columns in the embeddings' dtype."""
    if bool((offsets >= RADIX * RADIX * 2).any()):
        raise ValueError(f"vtprune: a position offset of {int(offsets.max())} is too large to carry in the embeddings")
    return torch.stack([offsets // RADIX, offsets % RADIX], -1).reshape(-1, COLUMNS).to(dtype)


def _read_columns(cols: torch.Tensor) -> torch.Tensor:
    d = cols.float().round().long().reshape(-1, 3, 2)
    return d[..., 0] * RADIX + d[..., 1]  # (k, 3)


def prompt_positions(n_tokens: int, media: Sequence[tuple[int, int, int]], one_d: bool) -> tuple[torch.Tensor, int]:
    """(3, N) positions and the decode delta of a prompt whose media items ``(offset, placeholders, extent)``
    (sorted by offset) are pruned: text as if unpruned, placeholders at their item's start (1-D: row 2 at its
    end)."""
    pos = torch.empty(3, n_tokens, dtype=torch.long)
    st, nxt = 0, 0  # next prompt index, next position
    for offset, length, extent in media:
        pos[:, st:offset] = torch.arange(offset - st) + nxt
        nxt += offset - st
        pos[:, offset : offset + length] = nxt  # the item's start, until recompute() writes the offsets
        if one_d:
            pos[2, offset : offset + length] = nxt + extent
        nxt += extent
        st = offset + length
    pos[:, st:] = torch.arange(n_tokens - st) + nxt
    nxt += n_tokens - st
    return pos, nxt - n_tokens


def decode_delta(positions: torch.Tensor, placeholder: torch.Tensor) -> int:
    """Position of the first generated token minus the prompt length (vLLM's ``mrope_position_delta``)."""
    n = positions.shape[1]
    if n == 0:
        return 0
    nxt = positions[2, -1] if bool(placeholder[-1]) else positions[:, -1].max() + 1  # 1-D: row 2 is the end
    return int(nxt) - n


def recompute(embeds: Sequence[torch.Tensor], positions: torch.Tensor, num_computed: int,
              placeholder: torch.Tensor, one_d: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Strip the offset columns from ``embeds`` (the media rows of this prefill chunk, in prompt order from
    ``num_computed`` on) and write each kept token's position (its item's start + its offset) into a copy of
    ``positions`` (3, N). ``placeholder``: (N,) bool, the media placeholders of the prompt."""
    out = [e[:, :-COLUMNS] for e in embeds]
    offsets = [_read_columns(e[:, -COLUMNS:]) for e in embeds]
    rows = sum(int(e.shape[0]) for e in embeds)
    if rows == 0:
        return out, positions
    if not one_d and bool(placeholder[-1]):
        raise ValueError("vtprune: an M-RoPE prompt must not end with a media placeholder (its end token follows)")
    positions = positions.clone()
    ph = placeholder.to(positions.device)
    starts = ph & ~torch.cat([ph.new_zeros(1), ph[:-1]])  # first placeholder of each run
    run_start = torch.cummax(torch.where(starts, torch.arange(ph.numel(), device=ph.device), -1), 0).values
    idx = ph.nonzero()[:, 0]
    idx = idx[idx >= num_computed][:rows]  # prompt index of every row of this chunk
    if idx.numel() != rows:
        raise RuntimeError(f"vtprune: {rows} media rows for {idx.numel()} placeholders after token {num_computed}")
    if one_d:  # row 1 of every placeholder holds its item's start (the rotary frequencies are all in row 0)
        base = positions[1, idx]
    else:  # the token before the item (Qwen's <|vision_start|>) is text, whose position is final
        s = run_start[idx]
        prev = (s - 1).clamp(min=0)
        base = torch.where(s > 0, positions[:, prev].max(0).values + 1, 0)
    off = torch.cat(offsets).to(positions.device)  # (rows, 3)
    if one_d:
        positions[0, idx] = base + off[:, 0]
    else:
        positions[:, idx] = base[None] + off.T
    return out, positions
