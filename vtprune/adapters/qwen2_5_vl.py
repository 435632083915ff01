"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): as Qwen2-VL, but the ViT permutes merged units into
attention windows and un-permutes them after the merger, so signals read inside the ViT (the merger input)
are mapped back to raster order with ``argsort(window_index)``."""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_window_index

from vtprune.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen2_5VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")

    def unit_rows(self, grid_thw: torch.Tensor) -> torch.Tensor:
        vc = self.config.vision_config
        window_index, _ = get_vision_window_index(grid_thw.cpu(), spatial_merge_size=vc.spatial_merge_size,
                                                  window_size=vc.window_size, patch_size=vc.patch_size)
        return torch.argsort(window_index)  # raster merged token j sits at merger-input unit rows[j]
