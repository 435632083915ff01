"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen ViT with learned position embeddings and DeepStack:
extra merger outputs added to the visual positions after the first LLM layers.

DeepStack inputs (``visual_pos_masks`` and every ``deepstack_visual_embeds[i]``) are cut consistently with
the main stream: before the LLM with the kept visual rows, and inside the LLM (pruning at a layer below the
last DeepStack layer) by mapping the injection onto the tokens present at that depth. Video frames are
separate placeholder blocks separated by timestamp tokens; each frame is a span.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.adapters.qwen2_vl import MergerFn, Qwen2VLAdapter


def _cut_deepstack(vis: torch.Tensor, embeds: list[torch.Tensor], index: torch.Tensor,
                   valid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Keep the DeepStack rows of the visual positions that survive ``index`` (B, L') / ``valid``."""
    rank = (vis.reshape(-1).long().cumsum(0) - 1).reshape(vis.shape)  # (B, L) row of each visual position
    new_vis = vis.gather(1, index) & valid  # (B, L')
    rows = rank.gather(1, index)[new_vis]  # (n_kept_visual,) in row-major order, as the LLM reads them
    return new_vis, [e[rows.to(e.device)] for e in embeds]


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")

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
                if m is not None and hidden_states.shape[1] != visual_pos_masks.shape[1]:
                    visual_pos_masks, (visual_embeds,) = _cut_deepstack(
                        visual_pos_masks, [visual_embeds], m.index.clamp(min=0), m.valid)
                return original(hidden_states, visual_pos_masks, visual_embeds)

            return deepstack_process

        patcher.wrap_method(lm, "_deepstack_process", wrap, what="vtprune: DeepStack on pruned layers")
