"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): Qwen3-VL's vision tower without DeepStack, interleaved M-RoPE
with partial rotary, and a hybrid decoder: Gated DeltaNet linear-attention layers (conv + recurrent state, no
attention map) mixed with gated full-attention layers (``config.text_config.layer_types``).

Pruning keeps the linear-attention state consistent by construction: each layer builds its conv and recurrent
state from the hidden states it receives, so a layer behind a pruning step holds the kept tokens only (the
masked reference of the tests removes those tokens for linear layers likewise). What this family changes:

* Masks by layer kind: linear layers take the 2-D padding mask (prefill; None at decode), never a 4-D one; full
  layers' decode masks are rebuilt over their own (possibly shorter) cache with ``create_causal_mask`` (HF sizes
  one decode mask from the first full layer, which may itself be behind a pruning step).
* In-LLM scoring only from full-attention layers (``attention_layers``): their ``q_proj`` holds a query and an
  output gate per head, and RoPE covers the first ``rotary_dim`` dimensions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers import masking_utils

from vtprune.adapters.base import LayerCut
from vtprune.adapters.qwen2_vl import _tiny_qwen_text
from vtprune.adapters.qwen3_vl import Qwen3VLAdapter
from vtprune.engine.sequence import apply_rope
from vtprune.registry import ADAPTERS


@ADAPTERS.register("qwen3_5")
class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model")

    def _types(self) -> list[str]:
        return list(self.language_model.config.layer_types)

    def attention_layers(self) -> frozenset[int]:
        return frozenset(i for i, t in enumerate(self._types()) if t == "full_attention")

    def layer_type(self, l: int) -> str:
        return self._types()[l]

    def mixer(self, l: int) -> nn.Module:
        layer = self.decoder_layers[l]
        return layer.self_attn if self.layer_type(l) == "full_attention" else layer.linear_attn

    def decoder_qk(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key: bool) -> torch.Tensor:
        d = attn.head_dim
        if key:
            y = attn.k_norm(attn.k_proj(x).view(*x.shape[:2], -1, d))
        else:  # per head [query | output gate]: the query half
            y = attn.q_norm(attn.q_proj(x).view(*x.shape[:2], -1, 2 * d)[..., :d])
        return apply_rope(y.transpose(1, 2), cos, sin)  # RoPE on the first rotary_dim dimensions

    def cut_layer_mask(self, l: int, mask: Any, cut: LayerCut) -> Any:
        if self.layer_type(l) != "full_attention":  # a 2-D padding mask, where there is padding (None at decode)
            pads = bool((cut.mask2d == 0).any())
            return None if cut.decode or not (pads or mask is not None) else cut.mask2d
        if cut.decode:  # over this layer's own cache: L' kept prompt tokens + the decoded ones
            config = self.language_model.config
            return masking_utils.create_causal_mask(config, cut.hidden, cut.mask2d, cut.cache, None, layer_idx=l)
        return super().cut_layer_mask(l, mask, cut)

    def install_extra(self, engine: Any, patcher: Any) -> None:
        """No DeepStack."""

    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        """``text_layers`` full-attention layers, then one linear-attention layer (the matrix's in-LLM cases score
        from layers 0 and 1); tests build other layouts by editing ``text_config.layer_types``."""
        import transformers as T

        types = ["full_attention"] * text_layers + ["linear_attention"]
        ids = _tiny_qwen_text(len(types), rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                              mrope_section=[2, 1, 1], mrope_interleaved=True)
        ids["text_config"].update(head_dim=16, layer_types=types, linear_conv_kernel_dim=4, linear_key_head_dim=8,
                                  linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
                      num_position_embeddings=64, spatial_merge_size=2, temporal_patch_size=2)
        return T.Qwen3_5Config(vision_config=vision, **ids), T.Qwen3_5ForConditionalGeneration
