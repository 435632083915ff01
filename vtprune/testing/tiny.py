"""Tiny random-weight VLMs built from transformers configs (nothing is downloaded), and inputs for them.

Used by the test matrix, the demo and the benchmarks. Token ids: 0 pad, 1 BOS, 2 EOS, 500 image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as T

PAD, BOS, EOS, IMAGE = 0, 1, 2, 500
VOCAB = 512
FAMILIES: tuple[str, ...] = ("llava", "llava_next")


def _text_config(layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2, inter: int = 128) -> T.LlamaConfig:
    return T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def _clip_config(image_size: int, patch: int = 14, hidden: int = 32, layers: int = 2, heads: int = 4) -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch, projection_dim=hidden)


def build(family: str, attn: str = "sdpa", *, seed: int = 0, dtype: torch.dtype = torch.float32,
          text_layers: int = 3) -> torch.nn.Module:
    """A tiny model of ``family`` ("llava": 16 image tokens; "llava_next": AnyRes 28 px tiles)."""
    torch.manual_seed(seed)
    if family == "llava":
        cfg = T.LlavaConfig(vision_config=_clip_config(56), text_config=_text_config(text_layers),
                            image_token_index=IMAGE, image_seq_length=16, vision_feature_select_strategy="default",
                            vision_feature_layer=-2)
        cls = T.LlavaForConditionalGeneration
    elif family == "llava_next":
        cfg = T.LlavaNextConfig(vision_config=_clip_config(28), text_config=_text_config(text_layers),
                                image_token_index=IMAGE, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
                                vision_feature_select_strategy="default", vision_feature_layer=-2)
        cls = T.LlavaNextForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES}")
    model = cls._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    model.generation_config.pad_token_id = PAD
    return model


def demo_llava(seed: int = 0, text_layers: int = 8, hidden: int = 512) -> torch.nn.Module:
    """LLaVA-1.5 geometry (336 px / patch 14 = 576 visual tokens) with a small random LLM, so that the LLM
    dominates prefill as it does at 7B scale. The vision tower is tiny on purpose (see DESIGN, speed)."""
    torch.manual_seed(seed)
    cfg = T.LlavaConfig(
        vision_config=_clip_config(336, hidden=64, layers=2, heads=4),
        text_config=_text_config(layers=text_layers, hidden=hidden, heads=8, kv_heads=4, inter=1376),
        image_token_index=IMAGE, image_seq_length=576, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = T.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = PAD
    return model


@dataclass
class Row:
    """One prompt: ``before`` text tokens, one image, ``after`` text tokens (ids drawn from a seed)."""

    before: int = 3
    after: int = 4
    image_size: tuple[int, int] = (40, 50)  # LLaVA-NeXT only (original H, W)
    images: int = 1
    seed: int = 0
    ids: list[int] = field(default_factory=list)


def image_tokens(model: torch.nn.Module, image_size: tuple[int, int] | None = None) -> int:
    """Number of LLM tokens one image becomes."""
    cfg = model.config
    if cfg.model_type == "llava":
        vc = cfg.vision_config
        return (vc.image_size // vc.patch_size) ** 2
    pv, sizes = _next_pixels(model, [image_size], seed=0)
    with torch.no_grad():
        return model.model.get_image_features(pv, sizes).pooler_output[0].shape[0]


def _next_pixels(model: torch.nn.Module, sizes: Sequence[tuple[int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    px = cfg.vision_config.image_size
    n = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, px) for s in sizes]
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(len(sizes), max(n), 3, px, px, generator=g).to(model.dtype)
    return pv, torch.tensor(sizes)


def make_inputs(model: torch.nn.Module, rows: Sequence[Row], padding: str = "left") -> dict[str, Any]:
    """Batch the rows with ``padding`` ("left" / "right"); pixel values are seeded per row."""
    cfg = model.config
    seqs, pixels, sizes = [], [], []
    for row in rows:
        g = torch.Generator().manual_seed(1000 + row.seed)
        text = torch.randint(3, 400, (row.before + row.after,), generator=g).tolist()
        ids = [BOS] + text[: row.before]
        for _ in range(row.images):
            ids += [IMAGE] * image_tokens(model, row.image_size if cfg.model_type != "llava" else None)
        ids += text[row.before :]
        seqs.append(ids)
        for i in range(row.images):
            if cfg.model_type == "llava":
                px = cfg.vision_config.image_size
                gp = torch.Generator().manual_seed(2000 + 10 * row.seed + i)
                pixels.append(torch.randn(1, 3, px, px, generator=gp).to(model.dtype))
            else:
                pv, sz = _next_pixels(model, [row.image_size], seed=2000 + 10 * row.seed + i)
                pixels.append(pv)
                sizes.append(sz)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(L - len(s), L) if padding == "left" else slice(0, len(s))
        input_ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
    if cfg.model_type == "llava":
        out["pixel_values"] = torch.cat(pixels)
    else:
        tiles = max(p.shape[1] for p in pixels)
        out["pixel_values"] = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1]))
                                         for p in pixels])
        out["image_sizes"] = torch.cat(sizes)
    return out
