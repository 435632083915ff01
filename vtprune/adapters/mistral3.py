"""Mistral-3 / Pixtral (``Mistral3ForConditionalGeneration``: Mistral-Small-3.1 / 3.2, Ministral-3): the packed
Pixtral ViT (no [CLS], 2-D axial RoPE) -> RMSNorm + 2 x 2 patch merger -> MLP projector -> Mistral LLM (1-D RoPE).

Layout. Images keep their own size: the processor resizes each (never up) so that both sides are multiples of
``patch * spatial_merge_size`` and keeps the whole picture (no crop, no pad). Image i is an ``h_i x w_i`` grid of
LLM tokens, ``image_sizes[i] // (patch * merge)``; the feature call returns one ``(h_i * w_i, D)`` tensor per image
and token (r, c) merges the ViT patches (2r..2r+1, 2c..2c+1) of its image. Each image is one span.

Break / end tokens. The prompt lays an image out as ``h`` runs of ``w`` ``[IMG]`` placeholders, each run followed
by ``[IMG_BREAK]``, the last by ``[IMG_END]`` instead. Unlike LLaVA-NeXT's ``image_newline`` (a feature row inside
the placeholder run), both are TEXT tokens with their own embeddings: never candidates, never counted in budgets,
never dropped. So a break always survives: a row whose ``[IMG]`` tokens were all dropped leaves its
``[IMG_BREAK]`` (consecutive breaks), at its original position like every kept token. There is no newline rule to
apply and ``newlines="all"`` is moot.

Vision tower. All images of a call are packed into one sequence with a block-diagonal mask, so ViT signals
(received attention, keys) are computed per image block from the captured attention input and its axial
rotary tables, never from the model's ``hidden_states`` (transformers 5.25 returns only the selected layer
there). Per-patch signals reach the LLM tokens through the merger's own ``unfold`` on patch indices: scores add
the 2 x 2 patches' attention mass, features concatenate them (``vit_features`` are a token's four patches of the
projector's input side by side, and ``projector_fn`` reproduces the projector from them).

Differences from the reference model: none in the forward. Not covered: Ministral-3's position-dependent query
scaling (beyond ``original_max_position_embeddings``, 16k tokens) is not applied by in-LLM scores
(``decoder_qk``); a checkpoint with a sliding window counts it over kept tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtprune.adapters.base import Adapter, GridBox, ImageLayout, VisionRecord
from vtprune.registry import ADAPTERS
from vtprune.signals import Projector

_BLOCK_ELEMENTS = 1 << 20  # attention probabilities held at once by received_attention (4 MB in float32)


def merged_patches(grids: list[tuple[int, int]], merge: int) -> torch.Tensor:
    """(n_tokens, merge^2) the packed-ViT rows each LLM token merges, for images of ``grids`` (patches per side,
    in the order the ViT packs them): the patch merger's own ``unfold`` run on patch indices, so the order within
    a token (kernel raster) is the merger's."""
    out, offset = [], 0
    for hp, wp in grids:
        idx = torch.arange(hp * wp, dtype=torch.float64).view(1, 1, hp, wp) + offset  # exact in float64
        out.append(F.unfold(idx, kernel_size=merge, stride=merge)[0].t().long())  # (tokens, merge^2)
        offset += hp * wp
    return torch.cat(out) if out else torch.zeros(0, merge * merge, dtype=torch.long)


@ADAPTERS.register("mistral3")
class Mistral3Adapter(Adapter):
    family = "mistral3"
    model_classes = ("Mistral3ForConditionalGeneration", "Mistral3Model")

    @property
    def merge(self) -> int:
        return self.config.spatial_merge_size

    @property
    def patch(self) -> int:
        return self.config.vision_config.patch_size

    def vit_layers(self) -> nn.ModuleList:
        return self.vision_tower.transformer.layers

    def vit_attention(self, vit_layer: int | None) -> nn.Module:
        h = self.feature_hidden_index(vit_layer)
        if h == 0:
            raise ValueError("vit_layer selects the patch embeddings, which have no attention; choose a layer >= 1")
        return self.vit_layers()[h - 1].attention

    # ------------------------------------------------------------------ layout
    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        if sizes is None:
            raise ValueError(f"{self.family}: get_image_features was called without image_sizes")
        feats = output.pooler_output  # tuple of (h_i * w_i, D), one per image
        grids = [(int(H) // self.patch, int(W) // self.patch) for H, W in torch.as_tensor(sizes).tolist()]
        if len(feats) != len(grids):
            raise ValueError(f"{self.family}: {len(feats)} feature tensors for {len(grids)} image_sizes")
        offset = 0
        for i, ((hp, wp), f) in enumerate(zip(grids, feats)):
            h, w = hp // self.merge, wp // self.merge
            if f.shape[0] != h * w:
                raise ValueError(f"{self.family}: image {i} has {f.shape[0]} features, its {hp} x {wp}-patch grid "
                                 f"merges to {h} x {w}")
            # src counts LLM tokens: ViT signals reach them through rows_to_tokens
            record.images.append(ImageLayout.raster(offset + torch.arange(h * w), h, w))
            offset += h * w
        record.n_vit = sum(hp * wp for hp, wp in grids)  # packed ViT rows (patches) of the call
        record.meta["blocks"] = [hp * wp for hp, wp in grids]  # the ViT's block-diagonal attention
        record.meta["token_patches"] = merged_patches(grids, self.merge)  # (n_tokens, merge^2)

    def grid_boxes(self, groups: int, image_size: tuple[int, int], processor: Any = None) -> list[GridBox]:
        """One grid over the whole picture: the processor resizes it (each side up to a multiple of
        patch * merge, a stretch of less than a cell) and neither crops nor pads it."""
        return [GridBox("" if groups == 1 else f"grid {g}") for g in range(groups)]

    # ------------------------------------------------------------------ vision-tower signals
    def _qk(self, attn: nn.Module, cap: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (H, N, d) queries and keys of a packed Pixtral attention layer (all images of the call)."""
        from transformers.models.pixtral.modeling_pixtral import apply_rotary_pos_emb

        x = cap["x"]  # (1, N, Dv)
        q = attn.q_proj(x).view(*x.shape[:2], attn.num_heads, attn.head_dim).transpose(1, 2)  # (1, H, N, d)
        k = attn.k_proj(x).view(*x.shape[:2], attn.num_heads, attn.head_dim).transpose(1, 2)
        cos, sin = cap["position_embeddings"]  # (N, d) each: the axial 2-D tables of the packed patches
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
        return q[0], k[0]

    def received_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        q, k = self._qk(attn, cap)  # (H, N, d)
        q = q.float() * attn.scaling
        k = k.float()
        out = torch.empty(q.shape[1], dtype=torch.float32, device=q.device)
        a = 0
        for n in record.meta["blocks"]:  # an image attends within itself only (the block-diagonal mask)
            b = a + n
            acc = torch.zeros(n, dtype=torch.float32, device=q.device)
            # query rows per block: the whole (H, n, n) map of a 1540 px image (110 x 110 patches, 16 heads)
            rows = max(1, _BLOCK_ELEMENTS // n)  # would be 16 x 12100^2 x 4 B = 9.4 GB
            for h in range(q.shape[0]):
                kt = k[h, a:b].t()  # (d, n)
                for r in range(a, b, rows):
                    acc += torch.softmax(q[h, r:min(r + rows, b)] @ kt, dim=-1).sum(0)
            out[a:b] = acc / (q.shape[0] * n)  # mean over heads and the image's queries
            a = b
        return out  # (n_vit,)

    def vit_keys(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        _, k = self._qk(attn, cap)  # (H, N, d): rotated, as the attention compares them
        return k.transpose(0, 1).reshape(k.shape[1], -1)  # (n_vit, H * d)

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        blocks = rows[record.meta["token_patches"].to(rows.device)]  # (n_tokens, merge^2, C)
        # scores: the attention mass of the token's patches; features: the patches side by side
        merged = blocks.sum(1) if kind == "score" else blocks.flatten(1)
        return list(merged.split([im.num_tokens for im in record.produced]))

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        feats = record.stash["features"]  # (N, Dv): the selected ViT layer, the projector's input
        feats = feats.reshape(-1, feats.shape[-1])
        patches = record.meta["token_patches"].to(feats.device)[src.to(feats.device)]  # (..., merge^2)
        return feats[patches].flatten(-2)  # (..., merge^2 * Dv), patch-major

    def projector_fn(self) -> Projector:
        """The projector on ``vit_feature_rows``' (..., merge^2 * Dv) rows: RMSNorm on each patch, the merger's
        Linear on its channel-major ``unfold`` order, then linear_1 -> act -> linear_2. No ``parts``: the merger's
        Linear sits between the norm and the MLP (zeroth_order then uses its JVP estimator)."""
        p, m2 = self.projector, self.merge**2

        def fn(x: torch.Tensor) -> torch.Tensor:
            y = p.norm(x.reshape(*x.shape[:-1], m2, -1))  # (..., merge^2, Dv)
            y = p.patch_merger.merging_layer(y.transpose(-1, -2).flatten(-2))  # unfold's (Dv, merge^2) order
            return p.linear_2(p.act(p.linear_1(y)))

        return Projector(fn)

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        """Patch 4, merge 2: an LLM token is 8 x 8 pixels; images up to 64 px a side (the rotary table)."""
        import transformers as T

        from vtprune.testing.tiny import BOS, EOS, IMAGE, PAD, VOCAB

        vision = T.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=64, patch_size=4)
        text = T.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                               sliding_window=None,  # MistralConfig's own default is 4096; Mistral-3 has none
                               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        cfg = T.Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMAGE, spatial_merge_size=2,
                               vision_feature_layer=-1)
        return cfg, T.Mistral3ForConditionalGeneration

    def tiny_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """LLM-token grid (h, w) of a tiny image of ``image_size`` (H, W): the nearest multiple of a token's 8 px
        a side, as the processor rounds, within the tower's 64 px."""
        f = self.patch * self.merge
        most = self.config.vision_config.image_size // f
        return tuple(min(most, max(1, round(s / f))) for s in image_size)  # type: ignore[return-value]

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        from vtprune.testing.tiny import IMAGE, VEND as IMG_END, VSTART as IMG_BREAK  # spare tiny ids

        h, w = self.tiny_grid(image_size)
        f = self.patch * self.merge
        pixels = torch.randn(1, 3, h * f, w * f, generator=torch.Generator().manual_seed(seed)).to(self.model.dtype)
        tokens = ([IMAGE] * w + [IMG_BREAK]) * h  # the processor's replace_image_token
        tokens[-1] = IMG_END
        return tokens, {"pixel_values": pixels, "image_sizes": torch.tensor([[h * f, w * f]])}

    def tiny_batch(self, input_ids: torch.Tensor, images: list[dict[str, torch.Tensor]],
                   videos: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """All images of all rows in one batch, zero-padded bottom / right to the largest, as the processor does."""
        if not images:
            return {}
        H = max(p["pixel_values"].shape[-2] for p in images)
        W = max(p["pixel_values"].shape[-1] for p in images)
        pixels = torch.cat([F.pad(p["pixel_values"], (0, W - p["pixel_values"].shape[-1], 0,
                                                      H - p["pixel_values"].shape[-2])) for p in images])
        return {"pixel_values": pixels, "image_sizes": torch.cat([p["image_sizes"] for p in images])}
