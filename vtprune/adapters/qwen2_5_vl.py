"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): as Qwen2-VL, but the ViT permutes merged units into
attention windows and un-permutes them after the merger, so signals read inside the ViT (the merger input)
are mapped back to raster order with ``argsort(window_index)``."""

from __future__ import annotations

from typing import Any

import torch
from transformers.vision_utils import get_vision_window_index

from vtprune.adapters.qwen2_vl import Qwen2VLAdapter, QwenVideo, _tiny_qwen_text
from vtprune.registry import ADAPTERS


class Qwen2_5Video(QwenVideo):
    """As Qwen2-VL, plus ``second_per_grid_ts``: seconds covered by one temporal patch (the M-RoPE time axis)."""

    def extra_inputs(self, b: Any, ids: torch.Tensor, pixels: dict[str, torch.Tensor],
                     video: Any) -> dict[str, torch.Tensor]:
        return {**super().extra_inputs(b, ids, pixels, video),
                "second_per_grid_ts": torch.tensor([b.frames.temporal_patch_size / video.sampled_fps])}


@ADAPTERS.register("qwen2_5_vl")
class Qwen2_5VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    video = Qwen2_5Video()

    def unit_rows(self, grid_thw: torch.Tensor) -> torch.Tensor:
        vc = self.config.vision_config
        window_index, _ = get_vision_window_index(grid_thw.cpu(), spatial_merge_size=vc.spatial_merge_size,
                                                  window_size=vc.window_size, patch_size=vc.patch_size)
        return torch.argsort(window_index)  # raster merged token j sits at merger-input unit rows[j]

    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                      window_size=56, fullatt_block_indexes=[1], spatial_merge_size=2, temporal_patch_size=2)
        return (T.Qwen2_5_VLConfig(vision_config=vision, **_tiny_qwen_text(text_layers)),
                T.Qwen2_5_VLForConditionalGeneration)
