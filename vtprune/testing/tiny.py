"""Tiny random-weight VLMs built from transformers configs (nothing is downloaded), and inputs for them.

Used by the test matrix, the demo and the benchmarks. Token ids: 0 pad, 1 BOS, 2 EOS, 500 image. Each family's
config and inputs live in its adapter (``tiny_config``, ``tiny_image``, ``tiny_video``, ``tiny_batch``); this
module holds the shared pieces and assembles prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as T

PAD, BOS, EOS, IMAGE, VIDEO, VSTART, VEND, TIMESTAMP = 0, 1, 2, 500, 501, 502, 503, 504
VOCAB = 512


def text_config(layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                inter: int = 128) -> T.LlamaConfig:
    """The tiny Llama the LLaVA-family test models share."""
    return T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def clip_config(image_size: int, patch: int = 14, hidden: int = 32, layers: int = 2,
                heads: int = 4) -> T.CLIPVisionConfig:
    """A tiny CLIP tower ([CLS] first)."""
    return T.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch, projection_dim=hidden)


def families() -> list[str]:
    """Every registered family with a tiny test model (its adapter defines ``tiny_config``): the test matrix."""
    from vtprune.adapters.base import Adapter
    from vtprune.registry import ADAPTERS

    return [n for n in ADAPTERS.names() if ADAPTERS.get(n).tiny_config.__func__ is not Adapter.tiny_config.__func__]


def _adapter_class(family: str) -> Any:
    from vtprune.registry import ADAPTERS

    if family not in families():
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(families())}")
    return ADAPTERS.get(family)


def build(family: str, attn: str = "sdpa", *, seed: int = 0, dtype: torch.dtype = torch.float32,
          text_layers: int = 3, edit: Any = None) -> torch.nn.Module:
    """A tiny model of ``family`` (its adapter's ``tiny_config``, changed by ``edit(config)`` if given) with seeded
    random weights."""
    adapter = _adapter_class(family)
    cfg, cls = adapter.tiny_config(text_layers)
    if edit is not None:
        edit(cfg)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    model.generation_config.pad_token_id = PAD
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a zero padding embedding would hide a padding slot leaking into real tokens
        model.get_input_embeddings().weight[PAD].normal_(generator=g)
    adapter.tiny_init(model, g)
    return model


@dataclass
class Row:
    """One prompt: ``before`` text tokens, one image, ``after`` text tokens (ids drawn from a seed)."""

    before: int = 3
    after: int = 4
    image_size: tuple[int, int] = (40, 50)  # LLaVA-NeXT: original (H, W); Qwen: grid from the adapter's tiny_grid
    images: int = 1
    video_frames: int = 0  # frames of one video after the image(s) (Qwen: a multiple of 2)
    seed: int = 0
    ids: list[int] = field(default_factory=list)


def _adapter(model: torch.nn.Module) -> Any:
    from vtprune.api import adapter_for

    return adapter_for(model)


def image_tokens(model: torch.nn.Module, image_size: tuple[int, int] | None = None) -> int:
    """Number of LLM tokens one image of ``image_size`` becomes."""
    ids, _ = _adapter(model).tiny_image(image_size or Row().image_size, seed=0)
    return sum(t == IMAGE for t in ids)


def make_inputs(model: torch.nn.Module, rows: Sequence[Row], padding: str = "left") -> dict[str, Any]:
    """Batch the rows with ``padding`` ("left" / "right"); pixel values are seeded per row."""
    adapter = _adapter(model)
    seqs, images, videos = [], [], []
    for row in rows:
        g = torch.Generator().manual_seed(1000 + row.seed)
        text = torch.randint(3, 400, (row.before + row.after,), generator=g).tolist()
        ids = [BOS] + text[: row.before]
        for i in range(row.images):
            tokens, pixels = adapter.tiny_image(row.image_size, seed=2000 + 10 * row.seed + i)
            ids += tokens
            images.append(pixels)
        if row.video_frames:
            tokens, pixels = adapter.tiny_video(row.video_frames, row.image_size, seed=3000 + row.seed)
            ids += tokens
            videos.append(pixels)
        seqs.append(ids + text[row.before :])
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(L - len(s), L) if padding == "left" else slice(0, len(s))
        input_ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, **adapter.tiny_batch(input_ids, images, videos)}
