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

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from vtprune.adapters.base import Adapter, ImageLayout, VisionRecord
from vtprune.signals import Projector, ProjectorMLP
from vtprune.video.inputs import VideoFormat
from vtprune.registry import ADAPTERS


_BLOCK_ELEMENTS = 1 << 20  # attention probabilities held at once by received_attention (4 MB in float32)


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


def qwen_resize_hw(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int,
                   num_frames: int | None = None, temporal_factor: int = 2) -> tuple[int, int]:
    """Target (H, W) of a Qwen video frame: multiples of ``factor`` (patch * merge), aspect kept, area bounded.

    Qwen2/2.5-VL bound the area of ONE frame by [min_pixels, max_pixels]. Qwen3-VL (``num_frames`` given)
    bounds the whole clip, ``frames x H x W`` (frames rounded to ``temporal_factor``), and first scales
    frames smaller than ``factor`` up to it.
    """
    if num_frames is not None:
        if num_frames < temporal_factor:
            raise ValueError(f"Qwen3-VL needs at least {temporal_factor} frames, got {num_frames}")
        if min(height, width) < factor:
            up = max(factor / height, factor / width)
            height, width = int(height * up), int(width * up)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds Qwen's limit of 200")
    t = 1 if num_frames is None else round(num_frames / temporal_factor) * temporal_factor
    frames = 1 if num_frames is None else num_frames
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if t * h * w > max_pixels:  # shrink: floor keeps the area under the cap
        scale = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif t * h * w < min_pixels:  # grow: ceil reaches the floor
        scale = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def qwen_patchify(video: torch.Tensor, patch: int, merge: int,
                  temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(F, C, H, W) -> ((t*h*w, C*temporal*patch*patch), (t, h, w)), the Qwen ViT's packed patch layout.

    Frames are padded to a multiple of ``temporal`` by repeating the last one. Rows are ordered by
    temporal group, then merge window (raster), then patch within the window (raster): the 2x2 patches a
    merged token pools are consecutive rows. A row flattens (channel, time, y, x).
    """
    F, C, H, W = video.shape
    if pad := -F % temporal:
        video = torch.cat([video, video[-1:].expand(pad, C, H, W)])
    t, h, w = video.shape[0] // temporal, H // patch, W // patch
    if h % merge or w % merge:
        raise ValueError(f"frame {H}x{W} is not a multiple of patch*merge = {patch * merge}")
    x = video.reshape(t, temporal, C, h // merge, merge, patch, w // merge, merge, patch)
    # (t, temporal, C, Hm, my, py, Wm, mx, px) -> (t, Hm, Wm, my, mx, C, temporal, py, px)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * temporal * patch * patch), (t, h, w)


class QwenVideo(VideoFormat):
    """Qwen2-VL's video processor: frames resized to multiples of patch * merge with the area of each frame in
    [min_pixels, max_pixels], packed as the ViT's patch rows with ``video_grid_thw``; the placeholder expands to
    one token per merged patch, wrapped in vision start / end by the chat template."""

    video_token, image_token = "<|video_pad|>", "<|image_pad|>"
    vision_start, vision_end = "<|vision_start|>", "<|vision_end|>"
    clip_bound = False  # Qwen3-VL bounds the area of the whole clip, not of one frame

    def defaults(self) -> dict[str, Any]:
        return {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}}

    def tiny(self, config: Any, side: int | None, frames: int) -> dict[str, Any]:
        """Frames of about ``side``^2 pixels (default 4 merge windows a side); a clip bound covers ``frames``."""
        vc = config.vision_config
        side = side or 4 * vc.patch_size * vc.spatial_merge_size
        area = side * side * (frames if self.clip_bound else 1)
        return {"size": {"shortest_edge": area, "longest_edge": area}, "patch_size": vc.patch_size,
                "temporal_patch_size": vc.temporal_patch_size, "merge_size": vc.spatial_merge_size}

    def builder_kwargs(self, config: Any) -> dict[str, Any]:
        return {}

    def target_hw(self, pre: Any, height: int, width: int, num_frames: int) -> tuple[int, int]:
        return qwen_resize_hw(height, width, factor=pre.patch_size * pre.merge_size,
                              min_pixels=pre.size["shortest_edge"], max_pixels=pre.size["longest_edge"],
                              num_frames=num_frames if self.clip_bound else None,
                              temporal_factor=pre.temporal_patch_size)

    def pack(self, pre: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pv, thw = qwen_patchify(x, pre.patch_size, pre.merge_size, pre.temporal_patch_size)
        return {"pixel_values_videos": pv, "video_grid_thw": torch.tensor([thw])}

    def placeholder(self, b: Any, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        t, h, w = pixels["video_grid_thw"][0].tolist()
        return b.video_token * (t * h * w // b.frames.merge_size**2)

    def extra_inputs(self, b: Any, ids: torch.Tensor, pixels: dict[str, torch.Tensor],
                     video: Any) -> dict[str, torch.Tensor]:
        image_id = b.tokenizer.convert_tokens_to_ids(getattr(b.tokenizer, "image_token", None) or self.image_token)
        return {"video_grid_thw": pixels["video_grid_thw"],
                "mm_token_type_ids": (ids == image_id).int() + 2 * (ids == b.video_token_id).int()}


@ADAPTERS.register("qwen2_vl")
class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    modalities = {"image": ("get_image_features", "image_token_id"),
                  "video": ("get_video_features", "video_token_id")}
    derives_decode_positions = True
    mrope = True
    video = QwenVideo()

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
        n = self.num_vit_layers()
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
            # column sums of the (H, m, m) probabilities, one head and a block of query rows at a time: the
            # whole matrix is 4 H m^2 bytes (340 MB at 2304 patches, 4.4 GB for one 1288 x 1288 image); a
            # cache-sized (rows, m) block per head is 1.4x faster on CPU than (H, rows, m) ones (209 vs 289 ms
            # for Qwen2-VL-7B's 16 x 2304 x 80, one thread)
            qs = qs * attn.scaling
            rows = max(1, _BLOCK_ELEMENTS // qs.shape[1])
            acc = torch.zeros(b - a, dtype=torch.float32, device=q.device)
            for h in range(qs.shape[0]):
                kt = ks[h].transpose(0, 1)  # (d, m)
                for r in range(0, b - a, rows):
                    acc += torch.softmax(qs[h, r:r + rows] @ kt, dim=-1).sum(0)
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

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return T.Qwen2VLConfig(vision_config=vision, **_tiny_qwen_text(text_layers)), T.Qwen2VLForConditionalGeneration

    def tiny_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) of a tiny image of ``image_size``: even, about twice the size / patch."""
        p = self.config.vision_config.patch_size
        return 2 * math.ceil(image_size[0] / p), 2 * math.ceil(image_size[1] / p)

    def _tiny_pixels(self, t: int, h: int, w: int, seed: int) -> torch.Tensor:
        vc = self.config.vision_config
        g = torch.Generator().manual_seed(seed)
        return torch.randn(t * h * w, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=g).to(self.model.dtype)

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        from vtprune.testing.tiny import IMAGE, VEND, VSTART

        h, w = self.tiny_grid(image_size)
        return [VSTART] + [IMAGE] * (h * w // 4) + [VEND], {"pixel_values": self._tiny_pixels(1, h, w, seed),
                                                            "image_grid_thw": torch.tensor([[1, h, w]])}

    def tiny_video(self, frames: int, image_size: tuple[int, int],
                   seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """One block of t = frames / 2 temporal patches (Qwen3-VL overrides: a block per frame)."""
        from vtprune.testing.tiny import VEND, VIDEO, VSTART

        t = frames // self.config.vision_config.temporal_patch_size
        h, w = self.tiny_grid(image_size)
        return [VSTART] + [VIDEO] * (t * h * w // 4) + [VEND], {"pixel_values_videos": self._tiny_pixels(t, h, w, seed),
                                                                "video_grid_thw": torch.tensor([[t, h, w]])}

    def tiny_batch(self, input_ids: torch.Tensor, images: list[dict[str, torch.Tensor]],
                   videos: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        from vtprune.testing.tiny import IMAGE, VIDEO

        types = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()  # required with a grid (0 text)
        return {"mm_token_type_ids": types, **super().tiny_batch(input_ids, images, videos)}


def _tiny_qwen_text(text_layers: int, **rope: Any) -> dict[str, Any]:
    """The text config and special token ids shared by the tiny Qwen-VL models."""
    from vtprune.testing.tiny import BOS, EOS, IMAGE, PAD, VEND, VIDEO, VOCAB, VSTART

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=BOS,
                eos_token_id=EOS, pad_token_id=PAD,
                rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return dict(text_config=text, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
                vision_end_token_id=VEND)
