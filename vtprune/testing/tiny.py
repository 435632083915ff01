"""Tiny random-weight VLMs built from transformers configs (nothing is downloaded), and inputs for them.

Used by the test matrix, the demo and the benchmarks. Token ids: 0 pad, 1 BOS, 2 EOS, 500 image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as T

PAD, BOS, EOS, IMAGE, VIDEO, VSTART, VEND, TIMESTAMP = 0, 1, 2, 500, 501, 502, 503, 504
VOCAB = 512
FAMILIES: tuple[str, ...] = ("llava", "llava_next", "llava_next_video", "llava_onevision", "internvl", "qwen2_vl",
                             "qwen2_5_vl", "qwen3_vl")
ANYRES = ("llava_next", "llava_next_video", "llava_onevision")
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _text_config(layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                 inter: int = 128) -> T.LlamaConfig:
    return T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def _clip_config(image_size: int, patch: int = 14, hidden: int = 32, layers: int = 2,
                 heads: int = 4) -> T.CLIPVisionConfig:
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
    elif family == "llava_next_video":
        cfg = T.LlavaNextVideoConfig(vision_config=_clip_config(56), text_config=_text_config(text_layers),
                                     image_token_index=IMAGE, video_token_index=VIDEO, spatial_pool_stride=2,
                                     image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                                     vision_feature_select_strategy="default", vision_feature_layer=-2)
        cls = T.LlavaNextVideoForConditionalGeneration
    elif family == "llava_onevision":
        siglip = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=56, patch_size=14, vision_use_head=False)
        text = T.Qwen2Config(**{k: v for k, v in _text_config(text_layers).to_dict().items()
                                if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                         "bos_token_id", "eos_token_id", "pad_token_id")})
        # pinpoints up to 4x4 tiles: a large canvas exceeds 9 tiles' worth and is down-sampled (anyres_max_9)
        cfg = T.LlavaOnevisionConfig(vision_config=siglip, text_config=text, image_token_index=IMAGE,
                                     video_token_index=VIDEO, vision_feature_select_strategy="full",
                                     vision_feature_layer=-1,
                                     image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112], [224, 224]])
        cls = T.LlavaOnevisionForConditionalGeneration
    elif family == "internvl":
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=112, patch_size=14)
        text = T.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        cfg = T.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, downsample_ratio=0.5,
                               vision_feature_layer=-1, vision_feature_select_strategy="default")
        cls = T.InternVLForConditionalGeneration
    elif family in QWEN:
        cfg, cls = _qwen_config(family, text_layers)
    else:
        raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES}")
    model = cls._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    model.generation_config.pad_token_id = PAD
    return model


def _qwen_config(family: str, text_layers: int) -> tuple[Any, type]:
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=BOS,
                eos_token_id=EOS, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return T.Qwen2VLConfig(vision_config=vision, text_config=text, **ids), T.Qwen2VLForConditionalGeneration
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                      window_size=56, fullatt_block_indexes=[1], spatial_merge_size=2, temporal_patch_size=2)
        return T.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids), T.Qwen2_5_VLForConditionalGeneration
    text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1], spatial_merge_size=2,
                  temporal_patch_size=2)
    return T.Qwen3VLConfig(vision_config=vision, text_config=text, **ids), T.Qwen3VLForConditionalGeneration


@dataclass
class Row:
    """One prompt: ``before`` text tokens, one image, ``after`` text tokens (ids drawn from a seed)."""

    before: int = 3
    after: int = 4
    image_size: tuple[int, int] = (40, 50)  # LLaVA-NeXT: original (H, W); Qwen: grid from qwen_grid()
    images: int = 1
    video_frames: int = 0  # frames of one video after the image(s) (Qwen: a multiple of 2)
    seed: int = 0
    ids: list[int] = field(default_factory=list)


def qwen_grid(model: torch.nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (h, w) of a Qwen image of ``image_size``: even, about twice the size / patch."""
    p = model.config.vision_config.patch_size
    return 2 * math.ceil(image_size[0] / p), 2 * math.ceil(image_size[1] / p)


def internvl_tiles(image_size: tuple[int, int]) -> int:
    """Tiles of a tiny InternVL image (the real processor picks them from the aspect ratio)."""
    return 1 + (image_size[0] // 28) % 3


def image_tokens(model: torch.nn.Module, image_size: tuple[int, int] | None = None) -> int:
    """Number of LLM tokens one image becomes."""
    cfg = model.config
    if cfg.model_type == "internvl":
        side = cfg.vision_config.image_size
        side = side[0] if isinstance(side, (list, tuple)) else side
        patch = cfg.vision_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return internvl_tiles(image_size) * int((side // patch) * cfg.downsample_ratio) ** 2
    if cfg.model_type in QWEN:
        h, w = qwen_grid(model, image_size)
        return h * w // 4
    if cfg.model_type == "llava":
        vc = cfg.vision_config
        return (vc.image_size // vc.patch_size) ** 2
    pv, sizes = _next_pixels(model, [image_size], seed=0)
    with torch.no_grad():
        return model.model.get_image_features(pv, sizes).pooler_output[0].shape[0]


def _next_pixels(model: torch.nn.Module, sizes: Sequence[tuple[int, int]],
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    px = cfg.vision_config.image_size
    n = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, px) for s in sizes]
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(len(sizes), max(n), 3, px, px, generator=g).to(model.dtype)
    return pv, torch.tensor(sizes)


def _qwen_pixels(model: torch.nn.Module, t: int, h: int, w: int, seed: int) -> torch.Tensor:
    vc = model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t * h * w, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=g).to(model.dtype)


def make_inputs(model: torch.nn.Module, rows: Sequence[Row], padding: str = "left") -> dict[str, Any]:
    """Batch the rows with ``padding`` ("left" / "right"); pixel values are seeded per row."""
    cfg = model.config
    qwen = cfg.model_type in QWEN
    seqs, pixels, sizes, videos, vgrids = [], [], [], [], []
    for row in rows:
        g = torch.Generator().manual_seed(1000 + row.seed)
        text = torch.randint(3, 400, (row.before + row.after,), generator=g).tolist()
        ids = [BOS] + text[: row.before]
        for i in range(row.images):
            seed = 2000 + 10 * row.seed + i
            if qwen:
                h, w = qwen_grid(model, row.image_size)
                ids += [VSTART] + [IMAGE] * (h * w // 4) + [VEND]
                pixels.append(_qwen_pixels(model, 1, h, w, seed))
                sizes.append(torch.tensor([[1, h, w]]))
            elif cfg.model_type == "llava":
                ids += [IMAGE] * image_tokens(model)
                px = cfg.vision_config.image_size
                pixels.append(torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(seed)).to(model.dtype))
            elif cfg.model_type == "internvl":
                ids += [VSTART] + [IMAGE] * image_tokens(model, row.image_size) + [VEND]
                px = cfg.vision_config.image_size
                px = px[0] if isinstance(px, (list, tuple)) else px
                pixels.append(torch.randn(internvl_tiles(row.image_size), 3, px, px,
                                          generator=torch.Generator().manual_seed(seed)).to(model.dtype))
            else:
                ids += [IMAGE] * image_tokens(model, row.image_size)
                pv, sz = _next_pixels(model, [row.image_size], seed=seed)
                pixels.append(pv)
                sizes.append(sz)
        if row.video_frames and not qwen:
            if cfg.model_type not in ("llava_next_video", "llava_onevision"):
                raise ValueError(f"make_inputs: {cfg.model_type} takes no video")
            px = cfg.vision_config.image_size
            side = px // cfg.vision_config.patch_size
            per_frame = (side // cfg.spatial_pool_stride) ** 2 if cfg.model_type == "llava_next_video" else (
                -(-side // 2)) ** 2
            ids += [VIDEO] * (row.video_frames * per_frame + (cfg.model_type == "llava_onevision"))
            g = torch.Generator().manual_seed(3000 + row.seed)
            videos.append(torch.randn(1, row.video_frames, 3, px, px, generator=g).to(model.dtype))
        elif row.video_frames:
            t = row.video_frames // cfg.vision_config.temporal_patch_size
            h, w = qwen_grid(model, row.image_size)
            per_frame = [VSTART] + [VIDEO] * (h * w // 4) + [VEND]
            if cfg.model_type == "qwen3_vl":  # every frame its own block after a timestamp token
                ids += [TIMESTAMP, *per_frame] * t
                vgrids += [torch.tensor([[1, h, w]])] * t
            else:
                ids += [VSTART] + [VIDEO] * (t * h * w // 4) + [VEND]
                vgrids.append(torch.tensor([[t, h, w]]))
            videos.append(_qwen_pixels(model, t, h, w, 3000 + row.seed))
        ids += text[row.before :]
        seqs.append(ids)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(L - len(s), L) if padding == "left" else slice(0, len(s))
        input_ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
    if qwen:
        out["mm_token_type_ids"] = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
        if pixels:
            out["pixel_values"], out["image_grid_thw"] = torch.cat(pixels), torch.cat(sizes)
        if videos:
            out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(videos), torch.cat(vgrids)
    elif cfg.model_type in ("llava", "internvl"):
        out["pixel_values"] = torch.cat(pixels)
    else:
        tiles = max(p.shape[1] for p in pixels)
        out["pixel_values"] = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1]))
                                         for p in pixels])
        out["image_sizes"] = torch.cat(sizes)
        if videos:
            frames = max(v.shape[1] for v in videos)
            assert all(v.shape[1] == frames for v in videos), "videos of one batch need the same frame count"
            out["pixel_values_videos"] = torch.cat(videos)
    return out
