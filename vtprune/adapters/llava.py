"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT -> 2-layer MLP projector -> Llama.

Each image is ``image_seq_length`` (576 for 336 px / patch 14) tokens in raster order; the ``default``
feature strategy drops CLIP's [CLS] token, ``full`` keeps it as the first token (a grid-less candidate).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from vtprune.adapters.base import Adapter, ImageLayout, VisionRecord
from vtprune.signals import ProjectorMLP
from vtprune.registry import ADAPTERS


def dense_qk(attn: nn.Module, x: torch.Tensor, key: bool = False) -> torch.Tensor:
    """(n, H, T, d) queries (or keys) of a dense ViT attention layer from its normed input x (n, T, Dv)."""
    n, T, _ = x.shape
    proj, norm = (attn.k_proj, getattr(attn, "k_norm", None)) if key else (attn.q_proj, getattr(attn, "q_norm", None))
    y = proj(x)
    if norm is not None:  # InternViT normalises the full projection before splitting heads
        y = norm(y)
    return y.view(n, T, attn.num_heads, -1).transpose(1, 2)


def projector_parts(p: nn.Module) -> ProjectorMLP | None:
    """The structure of LLaVA's projector (``linear_1, act, linear_2``; NeXT / OneVision / NeXT-Video alike) and
    InternVL's (``layer_norm`` first)."""
    if all(hasattr(p, n) for n in ("linear_1", "act", "linear_2")):
        return ProjectorMLP(p.linear_1, p.act, p.linear_2, getattr(p, "layer_norm", None))
    return None


@ADAPTERS.register("llava")
class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    @property
    def has_cls(self) -> bool:  # type: ignore[override]
        return self.config.vision_config.model_type == "clip_vision_model"

    def projector_parts(self) -> ProjectorMLP | None:
        return projector_parts(self.projector)

    def vit_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        encoder = tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder
        return encoder.layers

    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def _strategy(self, kwargs: dict) -> str:
        return kwargs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy

    def tile_tokens(self, strategy: str) -> tuple[int, int, int]:
        """(ViT tokens per tile T incl. [CLS], projector tokens per tile P, index of the first patch)."""
        patches = self.grid_side**2
        cls = 1 if self.has_cls else 0
        T = patches + cls
        P = patches if strategy == "default" else T
        return T, P, T - P

    # The per-tile ViT signals below work for every dense ViT attention with q_proj / k_proj (CLIP, SigLIP,
    # InternViT with its optional q/k norms); they return one value per ViT token of every tile.
    def cls_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        x = cap["x"]  # (n_tiles, T, Dv)
        q, k = dense_qk(attn, x[:, :1]), dense_qk(attn, x, key=True)  # (n, H, 1, d), (n, H, T, d)
        probs = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)  # (n, H, 1, T)
        return probs[:, :, 0].mean(1).reshape(-1)  # (n * T,)

    def received_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        out = []
        for tile in cap["x"].split(1):  # one tile at a time bounds memory at H x T x T
            q, k = dense_qk(attn, tile).float(), dense_qk(attn, tile, key=True).float()  # (1, H, T, d)
            probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # (1, H, T, T)
            out.append(probs.mean(dim=(1, 2)))  # (1, T): mean over heads and queries
        return torch.cat(out).reshape(-1)  # (n * T,)

    def vit_keys(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        k = dense_qk(attn, cap["x"], key=True)  # (n, H, T, d)
        return k.transpose(1, 2).reshape(-1, k.shape[1] * k.shape[3])  # (n * T, H * d)

    def vit_cls(self, record: VisionRecord, hidden: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        T = record.tokens_per_tile
        return hidden[(src // T).to(hidden.device), 0]  # the tile's token 0

    def padding_fraction(self, record: VisionRecord) -> torch.Tensor:
        """LLaVA-1.5 pads images to a square with the processor's mean colour (``expand2square``): after
        normalisation that fill is a constant close to 0 in every channel. A tile is padded when a whole
        border row (or column) has that constant; each patch's fraction of such pixels is returned."""
        pixels = record.stash.get("pixels")
        if pixels is None or pixels.dim() != 4 or record.tokens_per_tile == 0:
            return torch.zeros(record.n_vit)
        T, side = record.tokens_per_tile, self.grid_side
        out = torch.zeros(pixels.shape[0], T)
        for i, img in enumerate(pixels.float().cpu()):  # (3, H, W)
            fill = None
            for border in (img[:, 0, :], img[:, :, 0]):  # top row, left column
                if bool((border == border[:, :1]).all()) and bool(border[:, 0].abs().max() < 0.05):
                    fill = border[:, 0]
            if fill is None:
                continue
            is_fill = (img == fill[:, None, None]).all(0).float()  # (H, W)
            p = img.shape[-1] // side
            frac = is_fill[: side * p, : side * p].reshape(side, p, side, p).mean(dim=(1, 3)).reshape(-1)
            out[i, T - side * side :] = frac
        return out.reshape(-1)

    def _tile_layout(self, tile: int, T: int, P: int) -> ImageLayout:
        """One tile's projector tokens: [CLS] first for ``full`` (group -1), then the patch grid."""
        side = self.grid_side
        lay = ImageLayout.raster(tile * T + (T - side * side) + torch.arange(side * side), side, side)
        if P == side * side:
            return lay
        cls = ImageLayout(src=torch.tensor([tile * T]), grid=torch.tensor([[-1, 0, 0]]),
                          line=torch.tensor([-1]), frame=torch.zeros(1, dtype=torch.long))
        return ImageLayout(*(torch.cat([a, b]) for a, b in zip(
            (cls.src, cls.grid, cls.line, cls.frame), (lay.src, lay.grid, lay.line, lay.frame))))

    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        feats = output.pooler_output  # list of (n_i, D), one per image
        T, P, _ = self.tile_tokens(self._strategy(kwargs))
        record.tokens_per_tile, record.features_per_tile, record.n_vit = T, P, T * len(feats)
        for i, f in enumerate(feats):
            if f.shape[0] != P:
                raise NotImplementedError(
                    f"{self.family}: image {i} has {f.shape[0]} tokens, expected {P}; variable-size vision "
                    "backbones are not supported by this adapter"
                )
            record.images.append(self._tile_layout(i, T, P))

    def default_layouts(self, modality: str, n_visual: int) -> VisionRecord | None:
        T, P, _ = self.tile_tokens(self.config.vision_feature_select_strategy)
        if n_visual % P:
            return None
        record = VisionRecord(modality=modality, tokens_per_tile=T, features_per_tile=P)
        for i in range(n_visual // P):
            lay = self._tile_layout(i, T, P)
            lay.src = torch.full_like(lay.src, -2)  # candidates without a known vision-tower source
            record.images.append(lay)
        return record

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        from vtprune.testing.tiny import IMAGE, clip_config, text_config

        cfg = T.LlavaConfig(vision_config=clip_config(56), text_config=text_config(text_layers),
                            image_token_index=IMAGE, image_seq_length=16, vision_feature_select_strategy="default",
                            vision_feature_layer=-2)
        return cfg, T.LlavaForConditionalGeneration

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        from vtprune.testing.tiny import IMAGE

        px = self.config.vision_config.image_size
        pixels = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(seed))
        return [IMAGE] * self.grid_side**2, {"pixel_values": pixels.to(self.model.dtype)}
