"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): Qwen ViT (no [CLS]) -> 2x2 PatchMerger -> Qwen2 LLM
with 3-D M-RoPE.

Images and videos are separate modalities (``image_token_id`` / ``video_token_id``). Each image is its
merged ``(h/2) x (w/2)`` grid in raster order; a video is ``t`` frames (temporal patches) of such grids,
each frame a span under the default ``per_frame`` budget. Kept tokens keep the 3-D positions
``get_rope_index`` computed on the full sequence: they arrive as ``position_ids`` of shape (3|4, B, L) at
the LLM input and are gathered, never recomputed; decoding continues from the original length (manual
loops that pass no positions get the shift ``rope_deltas`` would have needed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from vtprune.adapters.base import Adapter, ImageLayout, VisionRecord
from vtprune.signals import Projector, ProjectorMLP


_BLOCK_ELEMENTS = 1 << 21  # attention probabilities held at once by received_attention (8 MB in float32)


def merger_parts(m: nn.Module) -> ProjectorMLP | None:
    """The structure of a Qwen merger: Qwen2/2.5-VL ``ln_q -> mlp[Linear, GELU, Linear]`` (the norm on each
    patch of a merged row), Qwen3-VL ``norm, linear_fc1, act_fn, linear_fc2``."""
    if hasattr(m, "ln_q") and isinstance(getattr(m, "mlp", None), nn.Sequential) and len(m.mlp) == 3:
        return ProjectorMLP(m.mlp[0], m.mlp[1], m.mlp[2], m.ln_q)
    if all(hasattr(m, n) for n in ("norm", "linear_fc1", "act_fn", "linear_fc2")):
        return ProjectorMLP(m.linear_fc1, m.act_fn, m.linear_fc2, m.norm)
    return None


class MergerFn(Projector):
    """A Qwen merger as a function of merged rows: (..., merge^2 * Dv) -> (..., D), with its structure (a norm
    on each patch -> Linear -> GELU -> Linear) for zeroth_order's closed form."""

    def __init__(self, module: nn.Module, dv: int, parts: ProjectorMLP | None) -> None:
        super().__init__(module, parts)
        self.module, self.dv = module, dv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.reshape(-1, self.dv)).reshape(*x.shape[:-1], -1)


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    modalities = {"image": ("get_image_features", "image_token_id"),
                  "video": ("get_video_features", "video_token_id")}
    derives_decode_positions = True
    mrope = True

    @property
    def projector(self) -> nn.Module:
        return self.vlm.visual.merger

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.visual

    @property
    def merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def vit_layers(self) -> nn.ModuleList:
        return self.vlm.visual.blocks

    def feature_hidden_index(self, vit_layer: int | None) -> int:
        n = len(self.vit_layers())
        layer = n if vit_layer is None else vit_layer  # the merger reads the last block's output
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"vit_layer={layer} is out of range for a {n}-block vision tower (use -{n + 1}..{n})")
        return layer % (n + 1)

    def vit_attention(self, vit_layer: int | None) -> nn.Module:
        h = self.feature_hidden_index(vit_layer)
        if h == 0:
            raise ValueError("vit_layer selects the patch embeddings, which have no attention; choose a layer >= 1")
        return self.vit_layers()[h - 1].attn

    def _qk(self, attn: nn.Module, cap: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (n, H, d) queries and keys of a packed Qwen ViT attention layer."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        x = cap["x"]  # (n_patches, Dv)
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = cap["position_embeddings"]
        return apply_rotary_pos_emb_vision(q, k, cos, sin)

    def _to_raster_units(self, per_patch: torch.Tensor, record: VisionRecord) -> torch.Tensor:
        """(n_patches, ...) in ViT order -> (n_units, ...) summed over each merged token's patches, raster."""
        units = per_patch.reshape(record.n_vit, self.merge**2, *per_patch.shape[1:]).sum(1)
        order = record.meta.get("unit_rows")
        return units if order is None else units[order.to(units.device)]

    def received_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        q, k = self._qk(attn, cap)  # (n, H, d)
        bounds = cap["cu_seqlens"].tolist()  # the segments this layer attends within (images or windows)
        out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
        for a, b in zip(bounds[:-1], bounds[1:]):
            qs, ks = q[a:b].transpose(0, 1).float(), k[a:b].transpose(0, 1).float()  # (H, m, d)
            # column sums of the (H, m, m) probabilities, a block of query rows at a time: the whole matrix
            # is 4 H m^2 bytes (340 MB at 2304 patches, 4.4 GB for one 1288 x 1288 image)
            rows = max(1, _BLOCK_ELEMENTS // (qs.shape[0] * qs.shape[1]))
            acc = torch.zeros(b - a, dtype=torch.float32, device=q.device)
            for r in range(0, b - a, rows):
                acc += ((qs[:, r:r + rows] @ ks.transpose(-1, -2)) * attn.scaling).softmax(-1).sum(dim=(0, 1))
            out[a:b] = acc / (qs.shape[0] * (b - a))
        # attention mass of a merged token = what its 2x2 patches receive
        return self._to_raster_units(out, record)

    def vit_keys(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        _, k = self._qk(attn, cap)  # (n, H, d)
        per_patch = k.reshape(k.shape[0], -1)  # (n, H * d)
        units = per_patch.reshape(record.n_vit, -1)  # the 2x2 patches' keys, concatenated
        order = record.meta.get("unit_rows")
        return units if order is None else units[order.to(units.device)]

    def unit_rows(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Merger-input unit of each raster-order merged token (None: the same order)."""
        return None

    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        grid_thw = kwargs.get(f"{modality}_grid_thw", args[1] if len(args) > 1 else None)
        m = self.merge
        offset = 0
        for t, h, w in grid_thw.tolist():
            hh, ww = h // m, w // m
            n = t * hh * ww
            j = torch.arange(n)
            frame = j // (hh * ww)
            grid = torch.stack([frame, (j % (hh * ww)) // ww, j % ww], dim=1)
            record.images.append(ImageLayout(src=offset + j, grid=grid, line=torch.full((n,), -1), frame=frame))
            offset += n
        record.n_vit = offset
        record.meta["unit_rows"] = self.unit_rows(grid_thw)

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        feats = record.stash["features"]  # (n_patches, Dv) merger input, in the ViT's own order
        units = feats.reshape(record.n_vit, -1)  # (n_units, merge^2 * Dv): the 2x2 patches of a merged token
        order = record.meta.get("unit_rows")
        rows = src if order is None else order.to(src.device)[src]
        return units[rows.to(units.device)]

    def projector_fn(self) -> Any:
        vc = self.config.vision_config
        return MergerFn(self.projector, vc.embed_dim if hasattr(vc, "embed_dim") else vc.hidden_size,
                        self.projector_parts())

    def projector_parts(self) -> ProjectorMLP | None:
        return merger_parts(self.projector)
