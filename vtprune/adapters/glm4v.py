"""GLM-4.1V (``Glm4vForConditionalGeneration``): a Qwen-style packed ViT (2-D rotary, learned position table
interpolated to each grid, no [CLS]) -> ``post_layernorm`` -> a 2x2 ``downsample`` Conv2d -> a gated MLP
``merger`` -> a GLM-4 LLM with 3-D M-RoPE on half of each head (``partial_rotary_factor``).

What differs from Qwen2-VL, and what the adapter does about it:

* A video's frames sit on the IMAGE placeholder (``<|image|>``): transformers scatters image and video features
  over the same positions, so a prompt (and a batch) holds images or a video, never both (transformers raises
  otherwise). Only the ``<|begin_of_video|> ... <|end_of_video|>`` brackets tell them apart: ``visual_masks``
  applies the processor's own rule (``create_mm_token_type_ids``: a placeholder inside the brackets is a
  video's) and the layouts come from whichever feature call ran.
* A video is one ``video_grid_thw`` row of ``t`` temporal patches (2 frames each); the processor writes every
  temporal patch as its own ``<|begin_of_image|> <|image|>* <|end_of_image|> <seconds>`` block and
  ``get_rope_index`` gives each block the next grid row, so each temporal patch is a frame (a span under the
  default ``per_frame`` budget) with its own ViT attention segment. Kept tokens keep the 3-D positions computed
  on the full prompt, as for Qwen (``rope_deltas`` follow).
* RoPE pairs ADJACENT dimensions (GPT-J style ``rotate_half_llm`` with pair-repeated cos / sin) on the first
  ``head_dim * partial_rotary_factor`` dimensions: ``decoder_qk`` uses transformers' own rotation, not the
  rotate-half ``apply_rope``.
* The projector is ``downsample`` (2x2 patches of ``Dv`` -> one token) then ``merger``: the captured projector
  input is the downsample's (n_tokens, Dv, 2, 2), so a token's vision features are its 2x2 patches (Dv-major,
  the conv's layout); ``projector_fn`` runs both modules. Its structure is not Linear-act-Linear (no closed form
  for zeroth_order; its JVP estimator applies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from vtprune.adapters.qwen2_vl import Qwen2VLAdapter, QwenVideo
from vtprune.registry import ADAPTERS
from vtprune.signals import Projector, ProjectorMLP

BOI, EOI = 505, 506  # the tiny models' <|begin_of_image|> / <|end_of_image|> (vtprune.testing.tiny ids below 505)


def split_by_brackets(placeholder: torch.Tensor, start: torch.Tensor,
                      end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, video) (B, L) bool: the placeholders outside / inside ``<|begin_of_video|>`` (``start``) ...
    ``<|end_of_video|>`` (``end``), the rule of the GLM-4.1V processor's ``create_mm_token_type_ids``."""
    inside = start.long().cumsum(-1) > end.long().cumsum(-1)  # (B, L)
    return placeholder & ~inside, placeholder & inside


def mm_token_types(ids: torch.Tensor, image_id: int, video_start_id: int, video_end_id: int) -> torch.Tensor:
    """(B, L) int ``mm_token_type_ids`` of a batch of ids: 1 image placeholder, 2 video placeholder, 0 else."""
    image, video = split_by_brackets(ids == image_id, ids == video_start_id, ids == video_end_id)
    return image.int() + 2 * video.int()


class Glm4vVideo(QwenVideo):
    """GLM-4.1V's video processor: Qwen's patch packing (14 px patches, 2 frames per temporal patch, 2x2 merge),
    CLIP mean / std, the area of the whole clip bounded (``smart_resize`` with ``num_frames``); the placeholder
    becomes one ``<|begin_of_image|><|image|>*n<|end_of_image|>{int seconds}`` block per temporal patch (its
    first frame's time, ``metadata.timestamps[::2]``), inside the template's begin / end of video."""

    video_token, image_token = "<|video|>", "<|image|>"
    vision_start, vision_end = "<|begin_of_video|>", "<|end_of_video|>"
    frame_start, frame_end = "<|begin_of_image|>", "<|end_of_image|>"
    clip_bound = True

    def defaults(self) -> dict[str, Any]:
        return {"size": {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 2 * 30000}}

    def _image_token(self, b: Any) -> str:
        return getattr(b.tokenizer, "image_token", None) or self.image_token

    def placeholder(self, b: Any, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        t, h, w = pixels["video_grid_thw"][0].tolist()
        per = h * w // b.frames.merge_size**2
        times = [float(s) for s in timestamps][::2][:t]  # one per temporal patch, padded with the last as HF does
        times += [times[-1] if times else 0.0] * (t - len(times))
        tok = self._image_token(b)
        return "".join(f"{self.frame_start}{tok * per}{self.frame_end}{int(s)}" for s in times)

    def extra_inputs(self, b: Any, ids: torch.Tensor, pixels: dict[str, torch.Tensor],
                     video: Any) -> dict[str, torch.Tensor]:
        conv = b.tokenizer.convert_tokens_to_ids
        return {"video_grid_thw": pixels["video_grid_thw"],
                "mm_token_type_ids": mm_token_types(ids, conv(self._image_token(b)), conv(b.vision_start),
                                                    conv(b.vision_end))}


class DownsampleMerger(Projector):
    """GLM-4.1V's projector as a function of a token's 2x2 patches: (..., Dv * m * m) (Dv-major, as the captured
    downsample input (n, Dv, m, m) flattens) -> ``merger(downsample(.))`` (..., D)."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        super().__init__(self._run, None)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        m = v.spatial_merge_size
        units = x.reshape(-1, v.downsample.in_channels, m, m)  # (n, Dv, m, m)
        tokens = v.downsample(units).reshape(units.shape[0], -1)  # (n, D)
        return v.merger(tokens).reshape(*x.shape[:-1], -1)


@ADAPTERS.register("glm4v")
class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    model_classes = ("Glm4vForConditionalGeneration", "Glm4vModel")
    # both modalities sit on the image placeholder; visual_masks splits them by the video brackets
    modalities = {"image": ("get_image_features", "image_token_id"),
                  "video": ("get_video_features", "image_token_id")}
    video = Glm4vVideo()

    @property
    def projector(self) -> nn.Module:
        return self.vlm.visual.downsample

    def visual_masks(self, input_ids: torch.Tensor | None,
                     inputs_embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        c = self.config
        ids = (c.image_token_id, c.video_start_token_id, c.video_end_token_id)
        if input_ids is not None:
            image, start, end = (input_ids == i for i in ids)
        elif inputs_embeds is not None:  # the same rule transformers' get_placeholder_mask uses, per token id
            table = self.vlm.get_input_embeddings()
            image, start, end = ((inputs_embeds == table(torch.tensor(i, device=inputs_embeds.device))).all(-1)
                                 for i in ids)
        else:
            return {}
        image, video = split_by_brackets(image, start, end)
        return {"image": image, "video": video}

    def decoder_qk(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key: bool) -> torch.Tensor:
        from transformers.models.glm4v.modeling_glm4v import rotate_half_llm

        proj = attn.k_proj if key else attn.q_proj
        y = proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
        r = cos.shape[-1]  # rotary dims (pair-repeated cos / sin (B, T, r)); the rest pass through
        rot = y[..., :r] * cos[:, None] + rotate_half_llm(y[..., :r]) * sin[:, None]
        return torch.cat([rot, y[..., r:]], dim=-1)

    def _qk(self, attn: nn.Module, cap: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb_vision

        x = cap["x"]  # (n_patches, Dv)
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = cap["position_embeddings"]
        return apply_rotary_pos_emb_vision(q, k, cos, sin)

    def projector_fn(self) -> Projector:
        return DownsampleMerger(self.vlm.visual)

    def projector_parts(self) -> ProjectorMLP | None:
        return None  # a 2x2 conv then a gated MLP

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        import transformers as T

        from vtprune.testing.tiny import BOS, EOS, IMAGE, PAD, VEND, VIDEO, VOCAB, VSTART

        # head_dim 16, half of it rotary: 4 frequencies split t / h / w as 2 / 1 / 1
        text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=BOS,
                    eos_token_id=EOS, pad_token_id=PAD,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                     "mrope_section": [2, 1, 1]})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                      image_size=56, spatial_merge_size=2, temporal_patch_size=2)
        config = T.Glm4vConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
                               image_start_token_id=BOI, image_end_token_id=EOI, video_start_token_id=VSTART,
                               video_end_token_id=VEND)
        return config, T.Glm4vForConditionalGeneration

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        from vtprune.testing.tiny import IMAGE

        h, w = self.tiny_grid(image_size)
        return [BOI] + [IMAGE] * (h * w // 4) + [EOI], {"pixel_values": self._tiny_pixels(1, h, w, seed),
                                                        "image_grid_thw": torch.tensor([[1, h, w]])}

    def tiny_video(self, frames: int, image_size: tuple[int, int],
                   seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """``<|begin_of_video|>``, then per temporal patch ``BOI IMAGE* EOI <seconds>``, ``<|end_of_video|>``: the
        video ONE ``video_grid_thw`` row, as the processor gives it."""
        from vtprune.testing.tiny import IMAGE, TIMESTAMP, VEND, VSTART

        t = frames // self.config.vision_config.temporal_patch_size
        h, w = self.tiny_grid(image_size)
        ids = [VSTART, *[BOI, *[IMAGE] * (h * w // 4), EOI, TIMESTAMP] * t, VEND]
        return ids, {"pixel_values_videos": self._tiny_pixels(t, h, w, seed),
                     "video_grid_thw": torch.tensor([[t, h, w]])}

    def tiny_batch(self, input_ids: torch.Tensor, images: list[dict[str, torch.Tensor]],
                   videos: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        c = self.config
        types = mm_token_types(input_ids, c.image_token_id, c.video_start_token_id, c.video_end_token_id)
        return {**super(Qwen2VLAdapter, self).tiny_batch(input_ids, images, videos), "mm_token_type_ids": types}
