"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen ViT with learned position embeddings and DeepStack:
extra merger outputs added to the visual positions after the first LLM layers.

DeepStack inputs (``visual_pos_masks`` and every ``deepstack_visual_embeds[i]``) are cut consistently with
the main stream: before the LLM with the kept visual rows, and inside the LLM (pruning at a layer below the
last DeepStack layer) by mapping the injection onto the tokens present at that depth. Video frames are
separate placeholder blocks separated by timestamp tokens; each frame is a span.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vtprune.adapters.qwen2_vl import MergerFn, Qwen2VLAdapter, QwenVideo, _tiny_qwen_text
from vtprune.registry import ADAPTERS


def _cut_deepstack(vis: torch.Tensor, embeds: list[torch.Tensor], index: torch.Tensor,
                   valid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Keep the DeepStack rows of the visual positions that survive ``index`` (B, L') / ``valid``."""
    rank = (vis.reshape(-1).long().cumsum(0) - 1).reshape(vis.shape)  # (B, L) row of each visual position
    new_vis = vis.gather(1, index) & valid  # (B, L')
    rows = rank.gather(1, index)[new_vis]  # (n_kept_visual,) in row-major order, as the LLM reads them
    return new_vis, [e[rows.to(e.device)] for e in embeds]


def qwen3_group_times(timestamps: Sequence[float], temporal: int = 2) -> list[float]:
    """Qwen3-VL's timestamp of each temporal patch: the mean of its first and last frame's times
    (the last frame repeated to fill the final patch, as the pixels are)."""
    ts = [float(t) for t in timestamps]
    if pad := -len(ts) % temporal:
        ts += [ts[-1]] * pad
    return [(ts[i] + ts[i + temporal - 1]) / 2 for i in range(0, len(ts), temporal)]


class Qwen3Video(QwenVideo):
    """Qwen3-VL's video processor: 16 px patches, mean / std 0.5, the area of the whole clip bounded; every
    temporal patch its own ``<t seconds><|vision_start|>...<|vision_end|>`` block, replacing the pair the chat
    template wrapped around the placeholder (as the Qwen reference processor does)."""

    clip_bound = True

    def defaults(self) -> dict[str, Any]:
        return {"size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}, "mean": (0.5,) * 3,
                "std": (0.5,) * 3, "patch_size": 16}

    def placeholder(self, b: Any, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        t, h, w = pixels["video_grid_thw"][0].tolist()
        per = h * w // b.frames.merge_size**2
        times = qwen3_group_times(timestamps, b.frames.temporal_patch_size)
        return "".join(f"<{s:.1f} seconds>{b.vision_start}{b.video_token * per}{b.vision_end}" for s in times[:t])

    def expand(self, b: Any, prompt: str, body: str) -> str:
        wrapped = f"{b.vision_start}{b.video_token}{b.vision_end}"
        return prompt.replace(wrapped, body, 1) if wrapped in prompt else prompt.replace(b.video_token, body, 1)


@ADAPTERS.register("qwen3_vl")
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    video = Qwen3Video()

    def projector_fn(self) -> Any:
        return MergerFn(self.projector, self.config.vision_config.hidden_size, self.projector_parts())

    def extra_lm_inputs(self, kwargs: dict, index: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        vis, embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if vis is None or embeds is None:
            return {}
        new_vis, new_embeds = _cut_deepstack(vis, list(embeds), index, valid)
        return {"visual_pos_masks": new_vis, "deepstack_visual_embeds": new_embeds}

    def install_extra(self, engine: Any, patcher: Any) -> None:
        if not engine.layer_steps:
            return
        lm = self.language_model

        def wrap(original):
            def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
                m = engine.current_layer_map()
                # the model hands every layer the LLM input's mask; behind an in-LLM step the hidden states are the
                # map's slots, even when re-padding left the length unchanged (a row keeping every token)
                if m is not None:
                    visual_pos_masks, (visual_embeds,) = _cut_deepstack(
                        visual_pos_masks, [visual_embeds], m.index.clamp(min=0), m.valid)
                return original(hidden_states, visual_pos_masks, visual_embeds)

            return deepstack_process

        patcher.wrap_method(lm, "_deepstack_process", wrap, what="vtprune: DeepStack on pruned layers")

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        ids = _tiny_qwen_text(text_layers, rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                              mrope_interleaved=True)
        ids["text_config"]["head_dim"] = 16
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1], spatial_merge_size=2,
                      temporal_patch_size=2)
        return T.Qwen3VLConfig(vision_config=vision, **ids), T.Qwen3VLForConditionalGeneration

    def tiny_video(self, frames: int, image_size: tuple[int, int],
                   seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Every temporal patch its own ``<t> VSTART VIDEO* VEND`` block, the video ONE ``video_grid_thw`` row as
        Qwen3-VL's processor gives it (get_rope_index splits it per frame)."""
        from vtprune.testing.tiny import TIMESTAMP, VEND, VIDEO, VSTART

        t = frames // self.config.vision_config.temporal_patch_size
        h, w = self.tiny_grid(image_size)
        ids = [TIMESTAMP, VSTART, *[VIDEO] * (h * w // 4), VEND] * t
        return ids, {"pixel_values_videos": self._tiny_pixels(t, h, w, seed),
                     "video_grid_thw": torch.tensor([[t, h, w]])}
