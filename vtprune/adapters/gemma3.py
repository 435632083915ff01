"""Gemma-3 (``Gemma3ForConditionalGeneration``): SigLIP (no [CLS]) -> average pooling to ``mm_tokens_per_image``
tokens (each the mean of a k x k block of patches) -> RMSNorm + projection -> Gemma-3 text model with sliding-
window and global layers.

The VLM hands its language model a dict of masks it built from the caller's 2-D mask and ``token_type_ids``:
causal + each image block attending to itself bidirectionally (full layers), intersected with a sliding window
(local layers). A cut sequence gets its masks rebuilt by the model's own functions in kept-token coordinates,
with the kept tokens' image blocks, before the LLM and behind an in-LLM step alike; decode masks likewise (HF
would read the first columns of the full-length mask). The sliding window then spans W kept tokens -- what the
sliding cache holds at decode, so prefill and decode agree (cutting HF's original-coordinate masks would not).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import masking_utils

from vtprune.adapters.base import Adapter, ImageLayout, LayerCut, VisionRecord
from vtprune.adapters.llava import LlavaAdapter
from vtprune.compat import cache_in
from vtprune.engine.sequence import cut_llm_input
from vtprune.registry import ADAPTERS
from vtprune.signals import Projector


def _block_ids(token_types: torch.Tensor) -> torch.Tensor:
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    return get_block_sequence_ids_for_mask(token_types)


@ADAPTERS.register("gemma3")
class Gemma3Adapter(LlavaAdapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")

    @property
    def has_cls(self) -> bool:  # type: ignore[override]
        return False

    def _grid(self) -> tuple[int, int]:
        """(patches per side P, LLM tokens per side g): each token pools a (P / g)^2 block of patches."""
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size, int(self.config.mm_tokens_per_image**0.5)

    @property
    def compact_refusal(self) -> str | None:
        return "its local and global layers use different rotary tables"

    # ------------------------------------------------------------------ layout and vision signals
    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        n = output.pooler_output.shape[0]  # (n_images, g*g, D)
        P, g = self._grid()
        record.tokens_per_tile = record.features_per_tile = P * P
        record.n_vit = n * P * P
        for i in range(n):  # src counts LLM tokens: ViT signals reach them through rows_to_tokens
            lay = ImageLayout.raster(i * g * g + torch.arange(g * g), g, g)
            record.images.append(lay)

    def default_layouts(self, modality: str, n_visual: int) -> VisionRecord | None:
        _, g = self._grid()
        if n_visual % (g * g):
            return None
        record = VisionRecord(modality=modality)
        for _ in range(n_visual // (g * g)):
            lay = ImageLayout.raster(torch.full((g * g,), -2), g, g)  # candidates without a known ViT source
            record.images.append(lay)
        return record

    def _blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """(n_images * P * P, C) per-patch rows -> (n_images, g * g, k * k, C): each token's block of patches."""
        P, g = self._grid()
        k, C = P // g, rows.shape[-1]
        x = rows.reshape(-1, g, k, g, k, C).permute(0, 1, 3, 2, 4, 5)  # (n, g, g, k, k, C)
        return x.reshape(x.shape[0], g * g, k * k, C)

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        blocks = self._blocks(rows)  # scores: the attention mass of the block; features: its patches side by side
        return list(blocks.sum(2) if kind == "score" else blocks.flatten(2))

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        feats = record.stash["features"]  # (n_images, P*P, Dv): the projector's input
        pooled = self._blocks(feats.reshape(-1, feats.shape[-1])).mean(2)  # (n, g*g, Dv): what the pool makes
        return pooled.reshape(-1, pooled.shape[-1])[src.to(pooled.device)]

    def projector_fn(self) -> Projector:
        p = self.projector  # on pooled rows: the RMSNorm and the projection the module applies after its pool
        return Projector(lambda x: p.mm_soft_emb_norm(x) @ p.mm_input_projection_weight)

    # ------------------------------------------------------------------ the language model's masks
    def _text_config(self) -> Any:
        return self.config.get_text_config()

    def takes_mask(self, mask: Any) -> bool:
        return isinstance(mask, dict) or super().takes_mask(mask)

    def padding_mask(self, mask: Any, embeds: torch.Tensor, vlm_kwargs: dict) -> torch.Tensor:
        caller = vlm_kwargs.get("attention_mask")
        return super().padding_mask(caller if torch.is_tensor(caller) and caller.dim() == 2 else None, embeds,
                                    vlm_kwargs)

    def cut_llm_input(self, embeds: torch.Tensor, kwargs: dict, index: torch.Tensor, valid: torch.Tensor,
                      mask0: torch.Tensor, vlm_kwargs: dict) -> dict[str, Any]:
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[:2])
        new = cut_llm_input(embeds, index, valid, mask0, positions, None)
        new["attention_mask"] = self._masks(new["inputs_embeds"], new.pop("attention_mask"), cache_in(kwargs),
                                            new["position_ids"], self._types(vlm_kwargs, index, valid))
        return new

    def cut_decode_mask(self, kwargs: dict, base_mask: torch.Tensor, orig_len: int, has_pads: bool,
                        new_tokens: int, vlm_kwargs: dict) -> Any:
        caller = vlm_kwargs.get("attention_mask")
        if torch.is_tensor(caller) and caller.dim() == 2:
            tail = caller[:, orig_len:].to(base_mask.dtype)
        else:
            tail = torch.ones(base_mask.shape[0], new_tokens, dtype=base_mask.dtype, device=base_mask.device)
        return masking_utils.create_masks_for_generate(self._text_config(), kwargs["inputs_embeds"],
                                                       torch.cat([base_mask, tail], 1), cache_in(kwargs),
                                                       kwargs.get("position_ids"))

    def cut_layer_mask(self, l: int, mask: Any, cut: LayerCut) -> Any:
        kind = self.language_model.config.layer_types[l]
        if cut.decode:  # over this layer's own cache (a sliding layer keeps its last W - 1 kept tokens)
            fn = (masking_utils.create_sliding_window_causal_mask if kind == "sliding_attention"
                  else masking_utils.create_causal_mask)
            return fn(self._text_config(), cut.hidden, cut.mask2d, cut.cache, None, layer_idx=l)
        types = self._types(cut.vlm_kwargs, cut.orig, cut.kv_valid)
        return self._masks(cut.hidden, cut.mask2d, None, None, types)[kind]

    token_types_key: ClassVar[str] = "token_type_ids"  # the VLM input marking each token's modality (1 image)

    def _types(self, vlm_kwargs: dict, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """The kept tokens' token types, padding slots 0 (never in an image block)."""
        types = vlm_kwargs.get(self.token_types_key)
        return None if types is None else types.gather(1, index.to(types.device)) * valid.to(types.device)

    def _masks(self, embeds: torch.Tensor, mask2d: torch.Tensor, cache: Any, positions: Any,
               types: torch.Tensor | None) -> dict:
        """The model's mask dict for a cut sequence: image blocks bidirectional where token types are known
        (as the VLM does; causal only without them, as the VLM does too)."""
        from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model

        config = self._text_config()
        if types is None:
            return masking_utils.create_masks_for_generate(config, embeds, mask2d, cache, positions)
        return create_masks_for_vision_model(config, embeds, mask2d, cache, positions, _block_ids(types))

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        """8 x 8 patches pooled to 4 x 4 = 16 tokens an image; sliding and global layers, the window wider
        than a test prompt (tests of the window build a narrower one)."""
        import transformers as T

        from vtprune.testing.tiny import BOS, EOS, IMAGE, PAD, VEND, VOCAB, VSTART

        vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=56, patch_size=7, vision_use_head=False)
        types = [("full_attention" if i % 2 else "sliding_attention") for i in range(text_layers)]
        text = T.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, query_pre_attn_scalar=16,
                                  sliding_window=512, max_position_embeddings=8192, layer_types=types,
                                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        cfg = T.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16, image_token_index=IMAGE,
                             boi_token_index=VSTART, eoi_token_index=VEND)
        return cfg, T.Gemma3ForConditionalGeneration

    @classmethod
    def tiny_init(cls, model: torch.nn.Module, generator: torch.Generator) -> None:
        w = model.model.multi_modal_projector.mm_input_projection_weight  # zeros from the model's own init
        with torch.no_grad():
            w.normal_(std=w.shape[0] ** -0.5, generator=generator)

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        from vtprune.testing.tiny import IMAGE, VEND, VSTART

        px = self.config.vision_config.image_size
        pixels = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(seed)).to(self.model.dtype)
        return [VSTART] + [IMAGE] * self.config.mm_tokens_per_image + [VEND], {"pixel_values": pixels}

    def tiny_batch(self, input_ids: torch.Tensor, images: list[dict[str, torch.Tensor]],
                   videos: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        from vtprune.testing.tiny import IMAGE

        return {"token_type_ids": (input_ids == IMAGE).long(), **Adapter.tiny_batch(self, input_ids, images, videos)}

