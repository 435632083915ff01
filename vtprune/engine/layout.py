"""From feature calls to a :class:`~vtprune.engine.state.Layout`: which image, frame, grid cell and vision-tower
row every placeholder of a prompt holds.

A feature call's :class:`~vtprune.adapters.base.VisionRecord` is paired with the output object it returned;
a forward given those features (``mm_encoder_outputs``) finds the record there, and a forward that encodes its
own pixels finds the record of the call it made. generate() may repeat the encoded images for beams and
``num_return_sequences``; the layouts follow that repetition.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vtprune.adapters.base import Adapter, ImageLayout, VisionRecord
from vtprune.engine.state import Layout


def pooled(output: Any) -> Any:
    """The per-image features of a feature call's output (a list / tuple of tensors, or one tensor)."""
    return output if torch.is_tensor(output) else getattr(output, "pooler_output", None)


def expanded(images: list[ImageLayout], mask: torch.Tensor, factor: int) -> list[ImageLayout]:
    """generate() encodes the images once, then repeats every sample ``factor`` times: rows s*factor ..
    s*factor+factor-1 all show sample s's images. Repeat the layouts the same way (HF's
    ``_expand_multimodal_outputs``), grouping images per sample by token count. Used where the features are
    one stacked tensor (repeated as a whole); a list of per-image tensors is matched element by element."""
    B = mask.shape[0]
    if B % factor:
        return images
    counts = mask.sum(1).tolist()
    out, i = [], 0
    for s in range(B // factor):
        need, group = counts[s * factor], []
        while need > 0 and i < len(images):
            group.append(images[i])
            need -= images[i].num_tokens
            i += 1
        out += group * factor
    return out


def placed(record: VisionRecord | None, given: Any, mask: torch.Tensor) -> VisionRecord | None:
    """``record`` with its per-image layouts in the order the features ``given`` to this forward are placed
    (None: no record)."""
    if record is None or given is None:
        return record
    now, produced = pooled(given), record.meta.get("pooled")
    if now is produced or (isinstance(now, (list, tuple)) and isinstance(produced, list) and len(now) == len(produced)
                           and all(a is b for a, b in zip(now, produced))):
        return record
    if isinstance(now, (list, tuple)) and isinstance(produced, list) and len(produced) == len(record.produced):
        by_id = {id(t): im for t, im in zip(produced, record.produced)}
        if all(id(t) in by_id for t in now):  # repeated element by element: follow the repetition
            return dataclasses.replace(record, images=[by_id[id(t)] for t in now])
    n_feat, n_visual = sum(im.num_tokens for im in record.produced), int(mask.sum())
    if n_feat and n_visual != n_feat and n_visual % n_feat == 0:  # a stacked tensor, repeated as a whole
        return dataclasses.replace(record, images=expanded(record.produced, mask, n_visual // n_feat))
    return record


def build_layout(adapter: Adapter, masks: dict[str, torch.Tensor], records: dict[str, VisionRecord | None],
                 input_ids: torch.Tensor | None = None) -> tuple[Layout, list[VisionRecord]]:
    """Assign every placeholder its image, frame, grid cell and ViT source, modality by modality, in the
    row-major order ``masked_scatter`` fills them. ``records``: the placed record of each modality; ``input_ids``
    (B, L): the prompt, when the model got it (the adapter's :meth:`~Adapter.image_spans` may read it)."""
    first = next(iter(masks.values()))
    B, L = first.shape
    dev = first.device
    visual = torch.zeros(B, L, dtype=torch.bool, device=dev)
    fields = {k: torch.full((B, L), -1, dtype=torch.long, device=dev) for k in ("image", "src", "line", "vtok")}
    fields["frame"] = torch.zeros(B, L, dtype=torch.long, device=dev)
    grid = torch.full((B, L, 3), -1, dtype=torch.long, device=dev)
    out: list[VisionRecord] = []
    n_images = vit_offset = line_offset = 0
    for modality, mask in masks.items():
        n_visual = int(mask.sum())
        if n_visual == 0:
            continue
        record = records.get(modality)
        if record is None or not record.images:
            record = adapter.default_layouts(modality, n_visual)
            if record is None:
                raise RuntimeError(
                    f"{adapter.family}: vtprune saw {n_visual} {modality} tokens but not the "
                    f"{adapter.modalities[modality][0]} call that made their features; pass the pixel values "
                    "(or features encoded while the model is pruned) so the layout is known")
        n_feat = sum(im.num_tokens for im in record.images)
        if n_feat != n_visual:
            raise ValueError(f"{modality} placeholders and features do not match: {n_visual} placeholder tokens, "
                             f"{n_feat} features")

        def cat(xs: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(xs).to(dev)

        src = cat([im.src for im in record.images])
        fields["src"][mask] = torch.where(src >= 0, src + vit_offset, src)  # -1 structural, -2 unknown
        fields["image"][mask] = cat([torch.full((im.num_tokens,), n_images + i) for i, im in enumerate(record.images)])
        fields["frame"][mask] = cat([im.frame for im in record.images])
        grid[mask] = cat([im.grid for im in record.images])
        lines = []
        for im in record.images:  # make canvas-row ids unique across images
            lines.append(torch.where(im.line >= 0, im.line + line_offset, im.line))
            line_offset += int(im.line.max()) + 1 if im.line.numel() and im.line.max() >= 0 else 0
        fields["line"][mask] = cat(lines)
        fields["vtok"][mask] = torch.arange(n_visual, device=dev) + int(visual.sum())
        visual |= mask
        n_images += len(record.images)
        vit_offset += record.n_vit
        out.append(record)
    fields["image"] = adapter.image_spans(fields["image"], visual, input_ids)
    layout = Layout(visual=visual, cand=visual & fields["src"].ne(-1), image=fields["image"], frame=fields["frame"],
                    src=fields["src"], grid=grid, line=fields["line"], vtok=fields["vtok"])
    return layout, out
