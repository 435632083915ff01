"""InternVL (HF-native ``InternVLForConditionalGeneration``): InternViT (with [CLS]) -> pixel shuffle 0.5
-> MLP projector -> Qwen2 / Llama. Each LLM token is a 2x2 block of ViT patches.

The feature call sees tiles only (448 px each, plus a thumbnail), so an image is a contiguous run of
placeholders in the prompt. Every ViT signal is mapped to LLM tokens through the model's own
``pixel_shuffle``, so a token's [CLS] attention is the attention mass of its four patches (FasterVLM's
InternVL failure, its issue #4, came from reading patch-level scores as if they were token-level).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from vtprune.adapters.base import GridBox, ImageLayout, VisionRecord
from vtprune.adapters.llava import LlavaAdapter
from vtprune.registry import ADAPTERS


@ADAPTERS.register("internvl")
class InternVLAdapter(LlavaAdapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    images_are_runs = True

    @property
    def has_cls(self) -> bool:  # type: ignore[override]
        return True

    def vit_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layer

    def vit_attention(self, vit_layer: int | None) -> nn.Module:
        h = self.feature_hidden_index(vit_layer)
        if h == 0:
            raise ValueError("vit_layer selects the patch embeddings, which have no attention; choose a layer >= 1")
        return self.vit_layers()[h - 1].attention

    def _shape(self) -> tuple[int, int]:
        side = self.config.vision_config.image_size[0] if isinstance(
            self.config.vision_config.image_size, (list, tuple)) else self.config.vision_config.image_size
        patch = self.config.vision_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        s = side // patch  # patches per side of a tile
        return s, int(s * self.config.downsample_ratio)  # (ViT grid side, LLM token grid side)

    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        feats = output.pooler_output  # (n_tiles, tokens_per_tile, D)
        s, g = self._shape()
        n_tiles = feats.shape[0]
        record.tokens_per_tile, record.features_per_tile, record.n_vit = s * s + 1, g * g, n_tiles * (s * s + 1)
        for t in range(n_tiles):  # one ImageLayout per tile; the engine joins a run of tiles into an image
            lay = ImageLayout.raster(torch.arange(g * g), g, g, group=t)
            lay.src = t * g * g + torch.arange(g * g)  # token index: signals go through rows_to_tokens
            record.images.append(lay)

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        s, g = self._shape()
        C = rows.shape[-1]
        patches = rows.reshape(-1, s * s + 1, C)[:, 1:].reshape(-1, s, s, C)  # drop [CLS]
        shuffled = self.vlm.pixel_shuffle(patches.float(), scale_factor=self.config.downsample_ratio)
        blocks = shuffled.reshape(-1, g * g, shuffled.shape[-1] // C, C)  # (tiles, g*g, 4, C)
        # scores: the attention mass of the token's patches; features: the patches side by side
        per_tile = blocks.sum(2) if kind == "score" else blocks.flatten(2)  # (tiles, g*g, C or 4C)
        return list(per_tile)  # one "image" per tile; the engine joins a run of tiles

    def grid_boxes(self, groups: int, image_size: tuple[int, int], processor: Any = None) -> list[GridBox]:
        """An image of one tile is the whole picture; of n > 1, n - 1 tiles of the picture resized to a
        cols x rows canvas, row-major, then the thumbnail (the whole picture). The canvas is the factorisation of
        n - 1 closest to the picture's aspect ratio, the processor's rule (its tie-break towards more tiles
        never applies among factorisations of one count)."""
        if groups == 1:
            return [GridBox("")]
        W, H = image_size
        n = groups - 1
        cols = min((c for c in range(1, n + 1) if n % c == 0), key=lambda c: abs(W / max(H, 1) - c / (n // c)))
        rows = n // cols
        tiles = [GridBox("tiles", (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows))
                 for r, c in (divmod(t, cols) for t in range(n))]
        return [*tiles, GridBox("thumbnail")]

    @property
    def grid_side(self) -> int:
        return self._shape()[1]

    def padding_fraction(self, record: VisionRecord) -> torch.Tensor:
        return torch.zeros(record.n_vit)  # InternVL tiles the image: there is no pad-to-square fill

    def vit_cls(self, record: VisionRecord, hidden: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        _, g = self._shape()
        return hidden[(src // (g * g)).to(hidden.device), 0]  # src counts LLM tokens: tile = src // tokens

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        feats = record.stash["features"]  # (n_tiles, g*g, 4*Dv): the pixel-shuffled projector input
        return feats.reshape(-1, feats.shape[-1])[local.to(feats.device)]

    def default_layouts(self, modality: str, n_visual: int) -> VisionRecord | None:
        return None

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        from vtprune.testing.tiny import BOS, EOS, IMAGE, PAD, VOCAB

        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=112, patch_size=14)
        text = T.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        cfg = T.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, downsample_ratio=0.5,
                               vision_feature_layer=-1, vision_feature_select_strategy="default")
        return cfg, T.InternVLForConditionalGeneration

    @staticmethod
    def tiny_tiles(image_size: tuple[int, int]) -> int:
        """Tiles of a tiny InternVL image (the real processor picks them from the aspect ratio)."""
        return 1 + (image_size[0] // 28) % 3

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        from vtprune.testing.tiny import IMAGE, VEND, VSTART

        _, g = self._shape()
        n = self.tiny_tiles(image_size)
        px = self.config.vision_config.image_size
        px = px[0] if isinstance(px, (list, tuple)) else px
        pixels = torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(seed)).to(self.model.dtype)
        return [VSTART] + [IMAGE] * (n * g * g) + [VEND], {"pixel_values": pixels}
