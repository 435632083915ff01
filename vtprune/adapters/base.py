"""What every model adapter knows: where the parts of one HF VLM family are and how its image tokens
are laid out. The shared hook machinery lives in :mod:`vtprune.adapters.engine`; an adapter only answers
family-specific questions (structure, visual-token layout, vision-tower signals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn


@dataclass
class ImageLayout:
    """The LLM tokens of one image (or video) in sequence order, and where each comes from.

    src:   (n,) long: row of the flattened vision-tower token array of this forward
           (``tile * tokens_per_tile + token``); -1 for structural tokens (LLaVA-NeXT's newlines), which
           are never candidates; -2 for candidates whose vision-tower source is unknown.
    grid:  (n, 3) long: (group, row, col); groups are separate grids (base tile, AnyRes canvas, frames).
    line:  (n,) long: id of the canvas row a token belongs to, for the newline rule; -1 if none.
    frame: (n,) long: video frame of each token; 0 for images.
    """

    src: torch.Tensor
    grid: torch.Tensor
    line: torch.Tensor
    frame: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.src.numel()

    @classmethod
    def raster(cls, src: torch.Tensor, height: int, width: int, group: int = 0) -> ImageLayout:
        """A plain ``height x width`` grid in raster order (no structural tokens)."""
        n = height * width
        r = torch.arange(n) // width
        c = torch.arange(n) % width
        grid = torch.stack([torch.full((n,), group), r, c], dim=1)
        return cls(src=src, grid=grid, line=torch.full((n,), -1), frame=torch.zeros(n, dtype=torch.long))


@dataclass
class VisionRecord:
    """What one ``get_image_features`` call produced: per-image layouts and captured ViT tensors."""

    images: list[ImageLayout] = field(default_factory=list)
    tokens_per_tile: int = 0  # ViT sequence length per tile, CLS included
    features_per_tile: int = 0  # tokens per tile fed to the projector (CLS dropped by "default")
    stash: dict[str, Any] = field(default_factory=dict)
    features: list[Any] = field(default_factory=list)  # the per-image feature tensors returned (identity)


class Adapter:
    """Family-specific knowledge. Subclasses set the class variables and override what differs."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[frozenset[str]] = frozenset({"vision", "input", "layer"})
    signals: ClassVar[frozenset[str]] = frozenset()
    has_cls: ClassVar[bool] = False
    mrope: ClassVar[bool] = False  # multi-row (M-RoPE) position ids
    tested_transformers: ClassVar[str] = "5.23"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.vlm: nn.Module = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.config = self.vlm.config

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    # ------------------------------------------------------------------ structure
    @property
    def language_model(self) -> nn.Module:
        return self.vlm.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def projector(self) -> nn.Module:
        return self.vlm.multi_modal_projector

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_tower

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def attn_implementation(self) -> str:
        return str(getattr(self.language_model.config, "_attn_implementation", "sdpa"))

    def visual_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """(B, L) bool: positions of visual placeholder tokens, computed before features are scattered."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        if inputs_embeds is not None:  # the same rule transformers' get_placeholder_mask uses
            emb = self.vlm.get_input_embeddings()(torch.tensor(self.image_token_id, device=inputs_embeds.device))
            return (inputs_embeds == emb).all(-1)
        return None

    # ------------------------------------------------------------------ vision tower
    def vit_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def feature_hidden_index(self, vit_layer: int | None) -> int:
        """Normalised hidden-states index (0 = embeddings) of ``vit_layer`` (None: the feature layer)."""
        n = len(self.vit_layers())
        layer = self.config.vision_feature_layer if vit_layer is None else vit_layer
        if isinstance(layer, (list, tuple)):  # multi-layer features: score with the deepest one
            layer = max(li % (n + 1) for li in layer)
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"vit_layer={layer} is out of range for a {n}-layer vision tower (use -{n + 1}..{n})")
        return layer % (n + 1)

    def vit_attention(self, vit_layer: int | None) -> nn.Module:
        """The self-attention module of the ViT layer that produces hidden state ``vit_layer``."""
        h = self.feature_hidden_index(vit_layer)
        if h == 0:
            raise ValueError("vit_layer selects the patch embeddings, which have no attention; choose a layer >= 1")
        return self.vit_layers()[h - 1].self_attn

    def cls_attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(n_tiles, T) head-mean attention of token 0 ([CLS]) from the normed ViT attention input x."""
        raise NotImplementedError(f"{type(self).__name__} has no [CLS] token")

    def vit_keys(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(n_tiles, T, Dv) keys of a ViT attention layer from its normed input x."""
        return attn.k_proj(x)

    # ------------------------------------------------------------------ layout
    def image_layouts(self, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        """Fill ``record`` from one ``get_image_features`` call (its arguments and output)."""
        raise NotImplementedError

    def default_layouts(self, n_visual: int) -> VisionRecord | None:
        """A layout when no ``get_image_features`` call was seen (features passed in precomputed)."""
        return None

    # ------------------------------------------------------------------ extension points
    def check(self, methods: list, positions: str) -> None:
        """Family-specific refusals at ``prune()`` time (raise ValueError naming method and model)."""
        if positions == "compact" and self.mrope:
            raise ValueError(f"positions='compact' is only defined for 1-D RoPE; {self.family} uses M-RoPE")
