"""What survived, in each image's own patch grid: the kept mask of every image, frame and grid of the last
prefill, after every stage, for drawing (``vtprune show``) or for a user's own figures.

    handle = vtprune.prune(model, "fastv", keep=64, layer=2)
    model.generate(**inputs)
    for im in handle.kept_masks():          # one ImageTokens per image / video of every batch row
        for g in im.grids:                  # base tile, AnyRes canvas, InternVL tile, video frame ...
            g.final                         # (h, w) bool: the cells that reach the last decoder layer

A grid is one :class:`~vtprune.adapters.base.ImageLayout` group of one frame: LLaVA-1.5's 24 x 24 patches, a
LLaVA-NeXT / OneVision image's base tile (group 0) and its unpadded AnyRes canvas (group 1), Qwen's merged
2x2 grid, each InternVL tile's pixel-shuffled grid (groups in tile order, the thumbnail last), each frame of a
video. Grid-less candidates (a kept [CLS] under ``vision_feature_select_strategy="full"``) and structural
tokens (AnyRes newlines) are counted per stage, not drawn. Where a grid cell sits in the picture is the
family's business: :meth:`vtprune.adapters.base.Adapter.grid_boxes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.types import PruneStats


@dataclass
class TokenGrid:
    """One grid of one image or frame. Stage 0 is the prompt; stage s >= 1 is ``stages[s]`` of the image."""

    row: int  # batch row
    image: int  # image / video of the row, in prompt order
    frame: int  # video frame (0 for images)
    group: int  # grid within the frame, in the family's order (0 base tile / the image; 1 AnyRes canvas; tile t)
    positions: torch.Tensor  # (h, w) long: prompt position of each cell's token, -1 where the grid has none
    kept: torch.Tensor  # (S + 1, h, w) bool: cells present after each stage
    merged: torch.Tensor  # (S + 1, h, w) bool: kept cells whose representation carries merged tokens
    stages: tuple[str, ...]  # ("prompt", "vision cls_attention", "layer:3 fastv", ...)

    @property
    def present(self) -> torch.Tensor:
        """(h, w) bool: cells that hold a token in the prompt."""
        return self.positions >= 0

    @property
    def final(self) -> torch.Tensor:
        """(h, w) bool: cells reaching the last decoder layer."""
        return self.kept[-1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positions.shape)  # type: ignore[return-value]


@dataclass
class ImageTokens:
    """One image or video of one batch row: its grids and the counts nobody can draw."""

    row: int
    image: int
    grids: list[TokenGrid]
    stages: tuple[str, ...]
    gridless: list[int]  # grid-less candidates ([CLS]) present after each stage (S + 1)
    structural: list[int]  # structural tokens (AnyRes newlines) present after each stage (S + 1)

    @property
    def frames(self) -> int:
        return 1 + max((g.frame for g in self.grids), default=0)

    def kept(self, stage: int = -1) -> int:
        """Candidates present after ``stage`` (grids and grid-less)."""
        return sum(int(g.kept[stage].sum()) for g in self.grids) + self.gridless[stage]

    def total(self) -> int:
        return self.kept(0)


def kept_masks(stats: PruneStats) -> list[ImageTokens]:
    """Per image of every row of the last prefill, its grids' kept masks after every stage (``[]`` before any
    prefill with images)."""
    lay = stats.layout
    if lay is None:
        return []
    stages = ("prompt", *(s.label for s in stats.stages))
    out = []
    for b in range(lay.visual.shape[0]):
        pos = lay.visual[b].nonzero()[:, 0]  # (n,) the row's visual positions
        pos_cpu = pos.cpu()
        # (S + 1, n): present after each stage; merged (cumulative: a merged token stays merged while kept)
        alive = torch.stack([torch.ones(pos.numel(), dtype=torch.bool),
                             *(torch.isin(pos_cpu, s.kept_positions[b].cpu()) for s in stats.stages)])
        merged = torch.zeros_like(alive)
        for s, st in enumerate(stats.stages, 1):
            now = st.merged_positions[b].cpu() if st.merged_positions else pos_cpu[:0]
            merged[s] = (merged[s - 1] | torch.isin(pos_cpu, now)) & alive[s]
        image, frame = lay.image[b, pos].cpu(), lay.frame[b, pos].cpu()
        grid, cand = lay.grid[b, pos].cpu(), lay.cand[b, pos].cpu()
        gridded = cand & (grid[:, 0] >= 0)
        for i, img in enumerate(dict.fromkeys(image.tolist())):  # images in prompt order
            on = image == img
            grids = []
            for f in sorted(set(frame[on & gridded].tolist())):
                sel_f = on & gridded & (frame == f)
                for g, raw in enumerate(sorted(set(grid[sel_f, 0].tolist()))):
                    sel = sel_f & (grid[:, 0] == raw)
                    r, c = grid[sel, 1], grid[sel, 2]
                    h, w = int(r.max()) + 1, int(c.max()) + 1
                    positions = torch.full((h, w), -1, dtype=torch.long)
                    positions[r, c] = pos_cpu[sel]
                    kept = torch.zeros(len(stages), h, w, dtype=torch.bool)
                    kept[:, r, c] = alive[:, sel]
                    mg = torch.zeros_like(kept)
                    mg[:, r, c] = merged[:, sel]
                    grids.append(TokenGrid(row=b, image=i, frame=f, group=g, positions=positions, kept=kept,
                                           merged=mg, stages=stages))
            out.append(ImageTokens(row=b, image=i, grids=grids, stages=stages,
                                   gridless=alive[:, on & cand & ~gridded].sum(1).tolist(),
                                   structural=alive[:, on & ~cand].sum(1).tolist()))
    return out
