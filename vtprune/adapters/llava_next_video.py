"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT images plus videos whose
frames are CLIP-encoded, pooled 2x2 (``vision_resampler``: average or max) and projected, with no newline.

Each frame is a span. ViT signals reach a pooled token through the model's own resampler (so a max-pooled
model scores a token by its best patch); ``vit_features`` are the resampler outputs, the projector's input.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.adapters.base import ImageLayout, VisionRecord
from vtprune.adapters.llava_next import LlavaNextAdapter


class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_classes = ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel")
    modalities = {"image": ("get_image_features", "image_token_id"),
                  "video": ("get_video_features", "video_token_id")}

    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        if modality == "image":
            return super().image_layouts(modality, args, kwargs, output, record)
        pv = kwargs.get("pixel_values_videos", args[0] if args else None)
        B, F = pv.shape[:2]
        T, P, first = self.tile_tokens(self._strategy(kwargs))
        side = self.grid_side
        stride = self.config.spatial_pool_stride
        h = w = side // stride
        record.tokens_per_tile, record.features_per_tile, record.n_vit = T, P, B * F * T
        record.meta["video"] = (B, F)
        j = torch.arange(F * h * w)
        frame, r, c = j // (h * w), (j % (h * w)) // w, j % w
        for b in range(B):
            src = (b * F + frame) * T + first + (stride * r) * side + stride * c  # top-left patch of the window
            record.images.append(ImageLayout(src=src, grid=torch.stack([frame, r, c], 1),
                                             line=torch.full((F * h * w,), -1), frame=frame))

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        if "video" not in record.meta:
            return super().rows_to_tokens(record, rows, kind)
        T, P, C = record.tokens_per_tile, record.features_per_tile, rows.shape[-1]
        per_frame = rows.reshape(-1, T, C)[:, T - P :]  # (B*F, P, C)
        B, _ = record.meta["video"]
        return list(self.vlm.vision_resampler(per_frame.float()).reshape(B, -1, C))  # the model's own pooling

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if "video" not in record.meta:
            return super().vit_feature_rows(record, src, local)
        feats = record.stash["features"]  # (B*F, n_pooled, Dv): the projector runs after pooling
        return feats.reshape(-1, feats.shape[-1])[local.to(feats.device)]
