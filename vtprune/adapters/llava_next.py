"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): AnyRes tiles + ``image_newline``.

Each image is the base tile (``image_size/patch`` squared tokens) followed by the unpadded AnyRes canvas,
one ``image_newline`` token after every canvas row (a single-tile image gets one trailing newline).
The layout is obtained by pushing tile/patch indices through the model's own ``pack_image_features``,
so it follows transformers' permute / unpad code exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vtprune.adapters.base import GridBox, ImageLayout, VisionRecord
from vtprune.adapters.llava import LlavaAdapter
from vtprune.registry import ADAPTERS


@ADAPTERS.register("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        strategy = self._strategy(kwargs)
        T, P, _ = self.tile_tokens(strategy)
        record.tokens_per_tile, record.features_per_tile = T, P
        vc = self.config.vision_config
        n_tiles = [image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                             patch_size=vc.image_size) for s in image_sizes]
        index_feats, offset = [], 0
        for n in n_tiles:  # (n_tiles, P, 1) float: global ViT-token row of every projector token
            tiles = torch.arange(offset, offset + n)[:, None] * T + torch.arange(T - P, T)[None, :]
            index_feats.append(tiles[..., None].double())
            offset += n
        record.n_vit = offset * T
        packed, _ = self.vlm.pack_image_features(
            index_feats, image_sizes, vision_feature_select_strategy=strategy,
            image_newline=torch.tensor([-1.0], dtype=torch.float64),
        )
        side = self.grid_side
        first = P - side * side  # 1 when the base tile's [CLS] is a projector token ("full" strategy)
        for feats, n in zip(packed, n_tiles):
            src = feats[:, 0].round().long()  # (n_i,), -1 = newline
            record.images.append(self._layout(src, n, side, first))

    @staticmethod
    def _layout(src: torch.Tensor, n_tiles: int, side: int, first: int) -> ImageLayout:
        n = src.numel()
        grid = torch.full((n, 3), -1, dtype=torch.long)
        line = torch.full((n,), -1, dtype=torch.long)
        base = side * side + first  # projector tokens of the base tile
        if first:  # "full" strategy: the base tile's [CLS] is a grid-less token
            grid[0] = torch.tensor([-1, 0, 0])
        grid[first:base, 0] = 0
        grid[first:base, 1] = torch.arange(side * side) // side
        grid[first:base, 2] = torch.arange(side * side) % side
        if n_tiles == 1:  # base tile + one trailing newline: one "row" for the newline rule
            line[:] = 0
            return ImageLayout(src=src, grid=grid, line=line, frame=torch.zeros(n, dtype=torch.long))
        canvas = torch.arange(base, n)
        is_nl = src[canvas] == -1
        row = torch.cumsum(is_nl.long(), 0) - is_nl.long()  # newline closes its own row
        line[canvas] = row
        starts = torch.cat([torch.zeros(1, dtype=torch.long), (torch.nonzero(is_nl)[:, 0] + 1)])[row]
        col = torch.arange(canvas.numel()) - starts
        grid[canvas, 0] = 1
        grid[canvas, 1] = row
        grid[canvas, 2] = col  # newlines get column = row width (never read: they are not candidates)
        return ImageLayout(src=src, grid=grid, line=line, frame=torch.zeros(n, dtype=torch.long))

    def grid_boxes(self, groups: int, image_size: tuple[int, int], processor: Any = None) -> list[GridBox]:
        """The base tile is the whole picture resized to one tile (squashed); the unpadded canvas is the whole
        picture too (the padding its crops carried is cut off). A video frame: one grid, the whole frame."""
        return [GridBox(name) for name in (("base tile", "AnyRes crops") if groups == 2 else ("",) * groups)]

    def default_layouts(self, modality: str, n_visual: int) -> VisionRecord | None:
        return None  # the AnyRes layout needs image_sizes: pass pixel_values

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        from vtprune.testing.tiny import IMAGE, clip_config, text_config

        cfg = T.LlavaNextConfig(vision_config=clip_config(28), text_config=text_config(text_layers),
                                image_token_index=IMAGE, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
                                vision_feature_select_strategy="default", vision_feature_layer=-2)
        return cfg, T.LlavaNextForConditionalGeneration

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """AnyRes tiles (1, n_tiles, 3, px, px) and ``image_sizes``; the token count comes from the model itself."""
        from vtprune.testing.tiny import IMAGE

        px = self.config.vision_config.image_size
        n = image_size_to_num_patches(image_size, self.config.image_grid_pinpoints, px)
        pixels = torch.randn(1, n, 3, px, px, generator=torch.Generator().manual_seed(seed)).to(self.model.dtype)
        sizes = torch.tensor([image_size])
        with torch.no_grad():
            tokens = self.vlm.get_image_features(pixels, sizes).pooler_output[0].shape[0]
        return [IMAGE] * tokens, {"pixel_values": pixels, "image_sizes": sizes}

    def tiny_batch(self, input_ids: torch.Tensor, images: list[dict[str, torch.Tensor]],
                   videos: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        tiles = max((p["pixel_values"].shape[1] for p in images), default=0)  # rows pad tiles to the batch's most
        padded = []
        for p in images:
            pv = p["pixel_values"]  # (1, n_tiles, 3, px, px)
            padded.append({**p, "pixel_values": torch.nn.functional.pad(pv, (0,) * 7 + (tiles - pv.shape[1],))})
        if videos and any(v["pixel_values_videos"].shape[1] != videos[0]["pixel_values_videos"].shape[1]
                          for v in videos):
            raise ValueError("make_inputs: videos of one batch need the same frame count")
        return super().tiny_batch(input_ids, padded, videos)
