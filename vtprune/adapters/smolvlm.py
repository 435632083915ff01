"""SmolVLM / Idefics3 (``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``): SigLIP-like ViT
(no [CLS], learned NaViT positions, post-LayerNorm) -> pixel shuffle by ``scale_factor`` r -> one Linear -> Llama
(``model.model.text_model``, 1-D RoPE). The two classes share this code path (same module tree, feature call,
prompt and scatter); only the 5.19 feature call differs (below).

Peculiarities and what the adapter does about each:

* **Where the parts are.** The LLM is ``text_model``, the tower ``vision_model``, the projector ``connector``: there is
  no ``language_model``, so ``vlm`` is set here (the base would pick the outer class).
* **Tiles.** The image processor cuts a picture into ``rows x cols`` tiles of ``max_image_size`` plus a global view
  (the whole picture squashed to one tile); a picture that fits one tile, and every video frame, is one tile. Each
  tile is its own g x g grid (grid group = tile), ``g = s / r`` for an ``s x s`` patch grid.
* **Pixel shuffle.** LLM token (i, j) of a tile concatenates the r x r patches (i*r.., j*r..): ViT signals reach the
  tokens through the connector's own ``pixel_shuffle`` (scores add the block's mass, features sit side by side),
  and ``src`` counts LLM tokens (``tile * g*g + token``), as for InternVL.
* **Padding tiles.** ``pixel_values`` is (B, max_tiles, 3, H, W) with all-zero tiles padding rows to the batch's tile
  count; the model drops them before the ViT, so they have no ViT rows and no tokens. The layout counts the real
  tiles of each row the model's way.
* **Structure tokens are text.** ``<fake_token_around_image>``, ``<row_r_col_c>``, ``<global-img>`` and newlines sit
  between the tiles' placeholder runs with text embeddings: never candidates, never counted, never dropped.
* **An image is several runs.** The feature call returns one entry per pixel_values row (a prompt row: every tile
  of every image in it), so it cannot say where one image ends. The prompt can: an image's last run is its global
  view, the only run preceded by ``<global-img>``. :meth:`image_spans` reads that id off the prompt (the token before
  a row's last run) and makes each image (tiles + global view) one span, as with AnyRes. Given embeddings instead
  of ids, a pixel_values row is one span (exact for one image per prompt).
* **5.19 vs 5.25.** ``pooler_output`` is one (n_tiles, g*g, D) tensor in 5.19, a per-row list of (n_b*g*g, D) in
  5.25; the tiles per row are counted from ``pixel_values`` for both.
* **Video.** The processor puts every frame in as a one-tile image (``<global-img>`` + placeholders) after a
  timestamp text; there is no video placeholder or feature call, so frames are images (one span each) and the family
  has no ``VideoFormat`` (its video processor needs torchvision).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from vtprune.adapters.base import GridBox, ImageLayout, VisionRecord
from vtprune.adapters.llava import LlavaAdapter
from vtprune.registry import ADAPTERS
from vtprune.signals import Projector

# tiny test prompts' structure tokens (vtprune.testing.tiny's ids stop at 504; its random text is 3..399)
FAKE, GLOBAL, NEWLINE = 505, 506, 507


def row_col(r: int, c: int) -> int:
    """The tiny prompts' ``<row_r_col_c>`` id (1-based, r, c <= 6 as in the real tokenizers)."""
    return 400 + 10 * r + c


@ADAPTERS.register("smolvlm")
class SmolVLMAdapter(LlavaAdapter):
    family = "smolvlm"
    model_classes = ("SmolVLMForConditionalGeneration", "SmolVLMModel",
                     "Idefics3ForConditionalGeneration", "Idefics3Model")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        inner = getattr(model, "model", None)
        self.vlm = inner if inner is not None and hasattr(inner, "text_model") else model
        self.config = self.vlm.config

    # ------------------------------------------------------------------ structure
    @property
    def has_cls(self) -> bool:  # type: ignore[override]
        return False

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.text_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_model

    @property
    def projector(self) -> nn.Module:
        return self.vlm.connector

    def vit_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layers

    def _shape(self) -> tuple[int, int, int]:
        """(patches per tile side s, shuffle factor r, LLM tokens per tile side g = s / r)."""
        vc = self.config.vision_config
        s, r = vc.image_size // vc.patch_size, self.config.scale_factor
        return s, r, s // r

    @property
    def grid_side(self) -> int:
        return self._shape()[2]

    # ------------------------------------------------------------------ layout
    def _real_tiles(self, pixel_values: torch.Tensor) -> list[int]:
        """Real tiles of each pixel_values row (B, N, 3, H, W): the model drops all-zero ones; SmolVLM keeps tile 0
        when no tile of the batch is real (Idefics3 keeps none)."""
        real = pixel_values.flatten(2).ne(0).any(-1)  # (B, N)
        if not bool(real.any()) and self.config.model_type == "smolvlm":
            real.view(-1)[0] = True
        return real.sum(1).tolist()

    def _record_rows(self, record: VisionRecord, tiles: list[int]) -> None:
        """One ImageLayout per pixel_values row: its tiles in order, each a g x g grid (group = tile in the row)."""
        s, _, g = self._shape()
        n = sum(tiles)
        record.tokens_per_tile, record.features_per_tile, record.n_vit = s * s, g * g, n * s * s
        record.meta["tiles"] = [t for t in tiles if t]
        first = 0
        for t in tiles:
            if not t:  # a row with no image: no tokens, and no entry in the features' list
                continue
            tiles_ = [ImageLayout.raster(torch.arange(g * g), g, g, group=k) for k in range(t)]
            src = first * g * g + torch.arange(t * g * g)  # token index: signals go through rows_to_tokens
            record.images.append(ImageLayout(src=src, grid=torch.cat([x.grid for x in tiles_]),
                                             line=torch.full((t * g * g,), -1),
                                             frame=torch.zeros(t * g * g, dtype=torch.long)))
            first += t

    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)  # (B, N, 3, H, W)
        tiles = self._real_tiles(pixels)
        feats = output.pooler_output  # 5.25: per row (n_b * g*g, D); 5.19: (n_tiles, g*g, D)
        _, _, g = self._shape()
        made = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]
        if made != sum(tiles) * g * g:
            raise ValueError(f"{self.family}: the feature call made {made} tokens, but pixel_values holds "
                             f"{sum(tiles)} real tiles of {g * g} tokens")
        self._record_rows(record, tiles)

    def default_layouts(self, modality: str, n_visual: int) -> VisionRecord | None:
        _, _, g = self._shape()
        if n_visual % (g * g):
            return None
        record = VisionRecord(modality=modality)
        self._record_rows(record, [n_visual // (g * g)])
        record.images[0].src = torch.full_like(record.images[0].src, -2)  # no known vision-tower source
        return record

    def image_spans(self, image: torch.Tensor, visual: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """One span per image (its tiles + its global view): an image ends with the run after ``<global-img>``,
        the token before each row's last placeholder run."""
        if input_ids is None:
            return image  # one pixel_values row = one image
        B, L = visual.shape
        ids = input_ids.to(visual.device)
        start = visual & ~torch.nn.functional.pad(visual[:, :-1], (1, 0))  # (B, L) first token of each run
        before = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=-1)  # (B, L) the token before each position
        last = (start.long() * torch.arange(1, L + 1, device=visual.device)).argmax(1, keepdim=True)  # (B, 1)
        ends = start & (before == before.gather(1, last))  # (B, L) the first token of each global-view run
        run = torch.cumsum(start.reshape(-1).long(), 0) - 1  # (B*L,) run of each token (flattened batch)
        is_end = ends.reshape(-1)[start.reshape(-1)]  # (runs,) whether a run is a global view
        done = torch.cumsum(is_end.long(), 0) - is_end.long()  # (runs,) images finished before each run
        return torch.where(visual, done[run.clamp(min=0)].reshape(B, L), -1)

    # ------------------------------------------------------------------ vision signals
    def _shuffle(self, rows: torch.Tensor) -> torch.Tensor:
        """(n_tiles * s*s, C) per-patch rows -> (n_tiles, g*g, r*r, C) through the connector's own shuffle."""
        s, r, g = self._shape()
        C = rows.shape[-1]
        shuffled = self.projector.pixel_shuffle(rows.reshape(-1, s * s, C), r)  # (n_tiles, g*g, r*r*C)
        return shuffled.reshape(-1, g * g, r * r, C)  # patch-major blocks

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        blocks = self._shuffle(rows.float())  # scores: the attention mass of the block; features: side by side
        per_tile = blocks.sum(2) if kind == "score" else blocks.flatten(2)  # (n_tiles, g*g, C or r*r*C)
        return [t.flatten(0, 1) for t in per_tile.split(record.meta["tiles"])]  # per produced image (row)

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        feats = record.stash["features"]  # (n_tiles, s*s, Dv): the connector's input
        shuffled = self._shuffle(feats.reshape(-1, feats.shape[-1])).flatten(2)  # (n_tiles, g*g, r*r*Dv)
        return shuffled.reshape(-1, shuffled.shape[-1])[src.to(feats.device)]

    def projector_fn(self) -> Projector:
        return Projector(self.projector.modality_projection)  # the Linear after the shuffle

    def projector_parts(self) -> None:
        return None  # one Linear, no MLP

    def padding_fraction(self, record: VisionRecord) -> torch.Tensor:
        return torch.zeros(record.n_vit)  # tiles cut from the resized picture: no pad-to-square fill

    # ------------------------------------------------------------------ drawing
    def grid_boxes(self, groups: int, image_size: tuple[int, int], processor: Any = None) -> list[GridBox]:
        """One grid: the whole picture (squashed to a tile). n + 1 grids: n tiles of the picture resized to
        rows x cols tiles (raster), then the global view (the whole picture). rows x cols is the image processor's
        (``get_number_of_image_patches``); without one, the factorisation of n closest to the aspect ratio."""
        if groups == 1:
            return [GridBox("")]
        W, H = image_size
        n = groups - 1
        ip = getattr(processor, "image_processor", processor)
        rows = cols = 0
        if ip is not None and hasattr(ip, "get_number_of_image_patches"):
            _, rows, cols = ip.get_number_of_image_patches(H, W)
        if rows * cols != n:
            cols = min((c for c in range(1, n + 1) if n % c == 0), key=lambda c: abs(W / max(H, 1) - c / (n // c)))
            rows = n // cols
        tiles = [GridBox("tiles", (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows))
                 for r, c in (divmod(t, cols) for t in range(n))]
        return [*tiles, GridBox("global view")]

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        """32 px tiles of 8 x 8 patches shuffled by 2: 16 tokens a tile."""
        import transformers as T

        from vtprune.testing.tiny import IMAGE, text_config

        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=4)
        cfg = T.SmolVLMConfig(vision_config=vision, text_config=text_config(text_layers), image_token_id=IMAGE,
                              scale_factor=2)
        return cfg, T.SmolVLMForConditionalGeneration

    @staticmethod
    def tiny_split(image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles of a tiny (H, W) picture: 32 px tiles up to 2 x 2; (0, 0) when it fits one tile
        (unsplit: no global view), as the processor's prompt counts them."""
        rows, cols = (min(2, -(-side // 32)) for side in image_size)
        return (0, 0) if rows == cols == 1 else (rows, cols)

    @staticmethod
    def image_prompt(rows: int, cols: int, seq: int) -> list[int]:
        """The processor's placeholder text of one image (``_prompt_split_image`` / ``_prompt_single_image``)."""
        from vtprune.testing.tiny import IMAGE

        if rows == cols == 0:
            return [FAKE, GLOBAL] + [IMAGE] * seq + [FAKE]
        out: list[int] = []
        for r in range(rows):
            for c in range(cols):
                out += [FAKE, row_col(r + 1, c + 1)] + [IMAGE] * seq
            out.append(NEWLINE)
        return out + [NEWLINE, FAKE, GLOBAL] + [IMAGE] * seq + [FAKE]

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        rows, cols = self.tiny_split(image_size)
        n = rows * cols + 1 if rows else 1
        px = self.config.vision_config.image_size
        pixels = torch.randn(1, n, 3, px, px, generator=torch.Generator().manual_seed(seed)).to(self.model.dtype)
        return self.image_prompt(rows, cols, self.grid_side**2), {
            "pixel_values": pixels, "pixel_attention_mask": torch.ones(1, n, px, px, dtype=torch.long)}

    def tiny_batch(self, input_ids: torch.Tensor, images: list[dict[str, torch.Tensor]],
                   videos: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """As the processor batches: one pixel_values row per prompt row (its images' tiles in order), padded with
        all-zero tiles (mask 0) to the batch's most tiles."""
        if not images:
            return {}
        per_row = (input_ids == GLOBAL).sum(1).tolist()  # one <global-img> per image
        rows, i = [], 0
        for k in per_row:
            parts = images[i:i + k]
            i += k
            rows.append({key: torch.cat([p[key][0] for p in parts]) if parts else images[0][key][0, :0]
                         for key in ("pixel_values", "pixel_attention_mask")})
        n = max(r["pixel_values"].shape[0] for r in rows)
        out = {}
        for key in ("pixel_values", "pixel_attention_mask"):
            ref = images[0][key]
            out[key] = torch.zeros(len(rows), n, *ref.shape[2:], dtype=ref.dtype)
            for b, r in enumerate(rows):
                out[key][b, :r[key].shape[0]] = r[key]
        return out
