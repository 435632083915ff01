"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT images plus videos whose
frames are CLIP-encoded, pooled 2x2 (``vision_resampler``: average or max) and projected, with no newline.

Each frame is a span. ViT signals reach a pooled token through the model's own resampler (so a max-pooled
model scores a token by its best patch); ``vit_features`` are the resampler outputs, the projector's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vtprune.adapters.base import ImageLayout, VisionRecord
from vtprune.adapters.llava_next import LlavaNextAdapter
from vtprune.video.inputs import VideoFormat
from vtprune.registry import ADAPTERS


class NextVideoFormat(VideoFormat):
    """LLaVA-NeXT-Video's video processor: shortest edge to 224, centre crop 224; each frame becomes
    (h / pool) x (w / pool) tokens (``spatial_pool_stride``), no newline."""

    def defaults(self) -> dict[str, Any]:
        return {"size": {"shortest_edge": 224}, "crop_size": (224, 224)}

    def builder_kwargs(self, config: Any) -> dict[str, Any]:
        return {"vit_patch": config.vision_config.patch_size, "pool_stride": getattr(config, "spatial_pool_stride", 2)}

    def placeholder(self, b: Any, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        F, _, H, W = pixels["pixel_values_videos"].shape[1:]
        gh, gw = H // b.vit_patch, W // b.vit_patch
        return b.video_token * (F * (gh // b.pool_stride) * (gw // b.pool_stride))


@ADAPTERS.register("llava_next_video")
class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    video = NextVideoFormat()
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

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        from vtprune.testing.tiny import IMAGE, VIDEO, clip_config, text_config

        cfg = T.LlavaNextVideoConfig(vision_config=clip_config(56), text_config=text_config(text_layers),
                                     image_token_index=IMAGE, video_token_index=VIDEO, spatial_pool_stride=2,
                                     image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                                     vision_feature_select_strategy="default", vision_feature_layer=-2)
        return cfg, T.LlavaNextVideoForConditionalGeneration

    def tiny_video(self, frames: int, image_size: tuple[int, int],
                   seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Frames (1, frames, 3, px, px); each becomes (side / pool stride)^2 tokens, no newline."""
        from vtprune.testing.tiny import VIDEO

        px = self.config.vision_config.image_size
        side = px // self.config.vision_config.patch_size
        pixels = torch.randn(1, frames, 3, px, px, generator=torch.Generator().manual_seed(seed)).to(self.model.dtype)
        return [VIDEO] * (frames * (side // self.config.spatial_pool_stride) ** 2), {"pixel_values_videos": pixels}
