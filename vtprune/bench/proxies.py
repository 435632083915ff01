"""Width-faithful proxy models for speed benchmarks: the real hidden sizes, heads and vocabularies of
LLaVA-1.5-7B and Qwen2-VL-7B with few layers, random weights.

All decoder layers of a model are identical, so a proxy measures one layer at each token count and the
benchmark scales it to the real depth (DESIGN, "Measuring speed honestly"). Geometry:

* llava-1.5-7b: CLIP ViT-L/14-336 (width 1024, 16 heads, MLP 4096; 24 layers, proxy 2) + Llama-2-7B
  (width 4096, 32 heads, MLP 11008, vocab 32000; 32 layers, proxy 4); 336 px, 576 visual tokens.
* qwen2-vl-7b: Qwen2-VL ViT (width 1280, 16 heads, MLP 5120, 2x2 merger; 32 blocks, proxy 2) + Qwen2-7B
  (width 3584, 28 heads / 4 KV, MLP 18944, vocab 152064 tied; 28 layers, proxy 4); 672 px, 576 tokens.
* tiny: CLIP width 64 (2 layers) + Llama width 128 (4 layers); 336 px, 576 tokens (CI smoke).

The prompt is LLaVA-shaped: 35 system tokens, the image, 12 question tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers as T

from vtprune.testing.tiny import BOS, EOS, IMAGE, PAD, VEND, VIDEO, VSTART


@dataclass(frozen=True)
class Proxy:
    name: str
    family: str
    vision_layers: int  # real depth of the vision tower
    text_layers: int  # real depth of the LLM
    proxy_vision_layers: int
    proxy_text_layers: int
    system_tokens: int = 35
    question_tokens: int = 12


PROXIES: dict[str, Proxy] = {
    "llava-1.5-7b": Proxy("llava-1.5-7b", "llava", 24, 32, 2, 4),
    "qwen2-vl-7b": Proxy("qwen2-vl-7b", "qwen2_vl", 32, 28, 2, 4),
    "tiny": Proxy("tiny", "llava", 2, 4, 2, 4),
}


def build_proxy(name: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The proxy model of ``name`` (see the table in this module's docstring)."""
    p = PROXIES[name]
    torch.manual_seed(seed)
    if name == "tiny":
        vision = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=336, patch_size=14)
        text = T.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, bos_token_id=BOS, eos_token_id=EOS,
                             pad_token_id=PAD)
    elif p.family == "llava":
        vision = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=p.proxy_vision_layers,
                                    num_attention_heads=16, image_size=336, patch_size=14)
        text = T.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=p.proxy_text_layers, num_attention_heads=32, num_key_value_heads=32,
                             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=8192)
    else:
        cfg = T.Qwen2VLConfig(
            vision_config=dict(depth=p.proxy_vision_layers, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=p.proxy_text_layers, num_attention_heads=28, num_key_value_heads=4,
                             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                              "mrope_section": [16, 24, 24]}),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
            tie_word_embeddings=True)
        model = T.Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
        model.generation_config.pad_token_id = PAD
        return model
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, image_seq_length=576,
                        vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = T.LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    model.generation_config.pad_token_id = PAD
    return model


def proxy_inputs(model: torch.nn.Module, proxy: Proxy, seed: int = 0, images: int = 1) -> dict[str, Any]:
    """A LLaVA-shaped single prompt for the proxy: system text, the image(s), a question. ``images > 1``
    (LLaVA geometry only) stands for a long visual context, e.g. 11 images = 6336 tokens ~ 32 video frames."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 400, (proxy.system_tokens + proxy.question_tokens,), generator=g).tolist()
    before, after = [BOS] + text[: proxy.system_tokens], text[proxy.system_tokens :]
    if proxy.family == "qwen2_vl":
        if images != 1:
            raise ValueError(f"proxy {proxy.name!r} takes one image, got images={images}")
        vc = model.config.vision_config
        h = w = 48  # 672 px / 14: 48 x 48 patches -> 24 x 24 = 576 merged tokens
        ids = torch.tensor([before + [VSTART] + [IMAGE] * (h * w // 4) + [VEND] + after])
        pixels = torch.randn(h * w, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=g).to(model.dtype)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                "image_grid_thw": torch.tensor([[1, h, w]]), "mm_token_type_ids": (ids == IMAGE).int()}
    n = model.config.image_seq_length
    ids = torch.tensor([before + [IMAGE] * (n * images) + after])
    px = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(images, 3, px, px, generator=g).to(model.dtype)}
