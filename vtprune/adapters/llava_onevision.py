"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP (no [CLS]) -> projector -> Qwen2,
AnyRes-max-9 images and pooled videos.

Images are laid out like LLaVA-NeXT (base tile, unpadded canvas, a newline per canvas row), except that a
canvas larger than 9 tiles is bilinearly DOWN-sampled after the projector, so a canvas token mixes
several patches. The layout is obtained by pushing canvas coordinates through the model's own
``pack_image_features`` (bilinear interpolation of a linear field returns each token's exact source
coordinate); ViT signals are pushed through the same code, so each token gets the interpolation of its
patches' scores. A video is ``frames`` 2x-bilinearly pooled grids followed by ONE newline token (kept
always: it closes no canvas row); every frame is a span.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from vtprune.adapters.base import ImageLayout, VisionRecord
from vtprune.adapters.llava_next import LlavaNextAdapter
from vtprune.video.inputs import VideoFormat
from vtprune.registry import ADAPTERS


class OnevisionVideo(VideoFormat):
    """LLaVA-OneVision's video processor: frames resized to 384 x 384; each becomes ceil(h / 2) x ceil(w / 2)
    tokens (2x bilinear pooling of the patch grid), plus one newline token per video."""

    def defaults(self) -> dict[str, Any]:
        return {"size": {"height": 384, "width": 384}}

    def tiny(self, config: Any, side: int | None, frames: int) -> dict[str, Any]:
        px = side or config.vision_config.image_size
        return {"size": {"height": px, "width": px}}

    def placeholder(self, b: Any, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        F, _, H, W = pixels["pixel_values_videos"].shape[1:]
        gh, gw = H // b.vit_patch, W // b.vit_patch
        return b.video_token * (F * math.ceil(gh / 2) * math.ceil(gw / 2) + 1)


@ADAPTERS.register("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    video = OnevisionVideo()
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    modalities = {"image": ("get_image_features", "image_token_id"),
                  "video": ("get_video_features", "video_token_id")}

    def _aspect(self, kwargs: dict) -> str:
        return kwargs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio

    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        if modality == "video":
            return self._video_layouts(args, kwargs, output, record)
        image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        T, P, _ = self.tile_tokens(self._strategy(kwargs))
        side, px = self.grid_side, self.config.vision_config.image_size
        record.tokens_per_tile, record.features_per_tile = T, P
        record.meta.update(image_sizes=image_sizes, aspect=self._aspect(kwargs))
        n_tiles = [image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                             patch_size=px) for s in image_sizes]
        coords = []
        for s, n in zip(image_sizes, n_tiles):  # canvas (row, col) of every patch of every tile
            nph, npw = get_anyres_image_grid_shape(s, self.config.image_grid_pinpoints, px) if n > 1 else (1, 1)
            t = torch.arange(n)[:, None]
            tr, tc = torch.div(t - 1, npw, rounding_mode="floor").clamp(min=0), ((t - 1) % npw).clamp(min=0)
            p = torch.arange(side * side)[None]
            coords.append(torch.stack([tr * side + p // side, tc * side + p % side], -1).double())  # (n, P, 2)
        packed, _ = self.vlm.pack_image_features(coords, image_sizes, image_newline=torch.tensor([-1.0, -1.0]),
                                                 vision_aspect_ratio=self._aspect(kwargs))
        offset = 0
        for feats, n, s in zip(packed, n_tiles, image_sizes):
            nph, npw = get_anyres_image_grid_shape(s, self.config.image_grid_pinpoints, px) if n > 1 else (1, 1)
            base = side * side
            is_nl = feats[:, 0] == -1
            rc = feats.round().long().clamp(min=0)
            tile = 1 + (rc[:, 0] // side) * npw + rc[:, 1] // side  # the tile each canvas token samples
            src = (offset + tile) * T + (T - P) + (rc[:, 0] % side) * side + rc[:, 1] % side
            src[:base] = offset * T + (T - P) + torch.arange(base)  # the base tile is not interpolated
            src[is_nl] = -1
            record.images.append(self._layout(src, n, side, 0))
            offset += n
        record.n_vit = offset * T

    def _video_layouts(self, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        pv = kwargs.get("pixel_values_videos", args[0] if args else None)
        B, F = pv.shape[:2]
        T, P, first = self.tile_tokens(self._strategy(kwargs))
        side = self.grid_side
        h = w = -(-side // 2)  # apply_pooling: ceil(side / 2)
        record.tokens_per_tile, record.features_per_tile, record.n_vit = T, P, B * F * T
        record.meta["video"] = (B, F)
        j = torch.arange(F * h * w)
        frame, r, c = j // (h * w), (j % (h * w)) // w, j % w
        for b in range(B):
            nearest = (b * F + frame) * T + first + (2 * r).clamp(max=side - 1) * side + (2 * c).clamp(max=side - 1)
            src = torch.cat([nearest, torch.tensor([-1])])
            grid = torch.cat([torch.stack([frame, r, c], 1), torch.tensor([[-1, -1, -1]])])
            record.images.append(ImageLayout(src=src, grid=grid, line=torch.full((F * h * w + 1,), -1),
                                             frame=torch.cat([frame, torch.tensor([F - 1])])))

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        T, P, C = record.tokens_per_tile, record.features_per_tile, rows.shape[-1]
        per_tile = rows.reshape(-1, T, C)[:, T - P :]  # (tiles or frames, P, C): drop [CLS] if any
        if "video" in record.meta:  # the model's own 2x bilinear pooling, then the trailing newline
            B, F = record.meta["video"]
            pooled = self.vlm.apply_pooling(per_tile.float()).reshape(B, -1, C)
            return list(torch.cat([pooled, pooled.new_zeros(B, 1, C)], 1))
        sizes = record.meta["image_sizes"]
        n_tiles = [image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                             patch_size=self.config.vision_config.image_size) for s in sizes]
        packed, _ = self.vlm.pack_image_features(list(per_tile.float().split(n_tiles)), sizes,
                                                 image_newline=per_tile.new_zeros(C, dtype=torch.float32),
                                                 vision_aspect_ratio=record.meta["aspect"])
        return list(packed)

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if "video" in record.meta:  # the projector ran on every frame patch before pooling: nearest patch
            feats = record.stash["features"]  # (B*F, P, Dv)
            T, P = record.tokens_per_tile, record.features_per_tile
            return feats.reshape(-1, feats.shape[-1])[((src // T) * P + src % T - (T - P)).to(feats.device)]
        return super().vit_feature_rows(record, src, local)  # nearest source patch of interpolated tokens

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        from vtprune.testing.tiny import IMAGE, VIDEO, text_config

        siglip = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=56, patch_size=14, vision_use_head=False)
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
        text = T.Qwen2Config(**{k: v for k, v in text_config(text_layers).to_dict().items() if k in keys})
        # pinpoints up to 4x4 tiles: a large canvas exceeds 9 tiles' worth and is down-sampled (anyres_max_9)
        cfg = T.LlavaOnevisionConfig(vision_config=siglip, text_config=text, image_token_index=IMAGE,
                                     video_token_index=VIDEO, vision_feature_select_strategy="full",
                                     vision_feature_layer=-1,
                                     image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112], [224, 224]])
        return cfg, T.LlavaOnevisionForConditionalGeneration

    def tiny_video(self, frames: int, image_size: tuple[int, int],
                   seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Frames (1, frames, 3, px, px); each becomes ceil(side / 2)^2 tokens (2x bilinear pooling), plus one
        newline per video."""
        from vtprune.testing.tiny import VIDEO

        px = self.config.vision_config.image_size
        side = px // self.config.vision_config.patch_size
        pixels = torch.randn(1, frames, 3, px, px, generator=torch.Generator().manual_seed(seed)).to(self.model.dtype)
        return [VIDEO] * (frames * (-(-side // 2)) ** 2 + 1), {"pixel_values_videos": pixels}
