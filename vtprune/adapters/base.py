"""What every model adapter knows: where the parts of one HF VLM family are and how its image tokens
are laid out. The shared machinery lives in :mod:`vtprune.engine`; an adapter only answers family-specific
questions (structure, visual-token layout, vision-tower signals, how its language model's inputs are cut)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from vtprune.engine.sequence import apply_rope, build_mask, cut_llm_input, decode_mask, take_mask
from vtprune.signals import SOURCES, Projector, ProjectorMLP


@dataclass
class ImageLayout:
    """The LLM tokens of one image (or video) in sequence order, and where each comes from.

    src:   (n,) long: row of the flattened vision-tower token array of this forward
           (``tile * tokens_per_tile + token``); -1 for structural tokens (LLaVA-NeXT's newlines), which
           are never candidates; -2 for candidates whose vision-tower source is unknown.
    grid:  (n, 3) long: (group, row, col); groups are separate grids (base tile, AnyRes canvas, frames).
    line:  (n,) long: id of the canvas row a token belongs to, for the newline rule; -1 if none.
    frame: (n,) long: video frame of each token; 0 for images.
    """

    src: torch.Tensor
    grid: torch.Tensor
    line: torch.Tensor
    frame: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.src.numel()

    @classmethod
    def raster(cls, src: torch.Tensor, height: int, width: int, group: int = 0) -> ImageLayout:
        """A plain ``height x width`` grid in raster order (no structural tokens)."""
        n = height * width
        r = torch.arange(n) // width
        c = torch.arange(n) % width
        grid = torch.stack([torch.full((n,), group), r, c], dim=1)
        return cls(src=src, grid=grid, line=torch.full((n,), -1), frame=torch.zeros(n, dtype=torch.long))


@dataclass(frozen=True)
class GridBox:
    """Where one grid of an image or frame (:mod:`vtprune.masks` order) lies in the original picture: ``box`` is
    (x0, y0, x1, y1) in units of the picture's width and height (beyond [0, 1] where the processor pads, inside
    where it crops), drawn on the panel named ``panel`` (grids that tile one picture share a panel)."""

    panel: str
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def seen_box(processor: Any, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of a ``(width, height)`` picture one square-tile image processor shows its vision tower: its
    pad-to-square canvas (``do_pad``, LLaVA's expand2square), its centre crop (``do_center_crop`` after a
    shortest-edge or fixed resize), or the whole picture (a plain resize, or no processor given)."""
    ip = getattr(processor, "image_processor", processor)
    W, H = image_size
    if ip is None or not W or not H:
        return (0.0, 0.0, 1.0, 1.0)
    if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square"):  # the square canvas around the picture
        side = max(W, H)
        dx, dy = (side - W) / 2 / W, (side - H) / 2 / H
        return (-dx, -dy, 1 + dx, 1 + dy)
    crop, size = getattr(ip, "crop_size", None), getattr(ip, "size", None)
    if getattr(ip, "do_center_crop", False) and crop is not None and size is not None:
        edge = _dim(size, "shortest_edge")
        if edge:  # resize the shortest edge to ``edge``, keeping the aspect ratio
            sw, sh = W * edge / min(W, H), H * edge / min(W, H)
        else:
            sw, sh = _dim(size, "width"), _dim(size, "height")
        cw, ch = _dim(crop, "width"), _dim(crop, "height")
        if sw and sh and cw and ch:
            fx, fy = min(cw / sw, 1.0), min(ch / sh, 1.0)
            return (0.5 - fx / 2, 0.5 - fy / 2, 0.5 + fx / 2, 0.5 + fy / 2)
    return (0.0, 0.0, 1.0, 1.0)


def _dim(size: Any, key: str) -> Any:
    """A field of an image processor's size (a dict, or transformers' SizeDict)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


@dataclass
class LayerCut:
    """Where decoder layer l's tokens come from behind an in-LLM step, for :meth:`Adapter.cut_layer_mask`.

    kv_index / kv_valid (B, KV'): the key slots of the layer in the coordinates of the mask the model computed
    (prefill: the LLM input; decode: the LLM input plus the generated tokens), False on padding slots; q_index
    (B, Q'): the query slots (prefill; None at decode); mask2d (B, KV') long: the layer's 2-D padding mask in its
    own coordinates; hidden: the layer's input; cache: the KV cache (None in an uncached prefill); decode; orig and
    vlm_kwargs, for a family that rebuilds its masks from its own inputs."""

    kv_index: torch.Tensor
    kv_valid: torch.Tensor
    q_index: torch.Tensor | None
    mask2d: torch.Tensor
    hidden: torch.Tensor
    cache: Any
    decode: bool
    orig: torch.Tensor | None = None  # (B, L') prefill: the ORIGINAL position of each of the layer's slots
    vlm_kwargs: dict = field(default_factory=dict)  # what the VLM's forward was given (family inputs)


@dataclass
class VisionRecord:
    """What one ``get_image_features`` / ``get_video_features`` call produced: per-image layouts (``src``
    indexes this record's ViT token rows) and the vision-tower tensors captured during the call."""

    modality: str = "image"
    images: list[ImageLayout] = field(default_factory=list)
    n_vit: int = 0  # ViT token rows of this call (all tiles / frames), the range of ``src``
    tokens_per_tile: int = 0  # ViT sequence length per tile, CLS included (LLaVA-style towers)
    features_per_tile: int = 0  # tokens per tile fed to the projector (CLS dropped by "default")
    stash: dict[str, Any] = field(default_factory=dict)
    produced: list[ImageLayout] = field(default_factory=list)  # ``images`` as the call produced them
    meta: dict[str, Any] = field(default_factory=dict)  # adapter-specific (e.g. Qwen2.5-VL window order)


class Adapter:
    """Family-specific knowledge. Subclasses set the class variables and override what differs."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    # modality -> (feature method on the VLM, config attribute of its placeholder token id)
    modalities: ClassVar[dict[str, tuple[str, str]]] = {"image": ("get_image_features", "image_token_id")}
    # the VLM derives decode positions from the cache length when given none (Qwen's rope_deltas)
    derives_decode_positions: ClassVar[bool] = False
    # the feature call returns tiles, and an image is a contiguous run of placeholders (InternVL)
    images_are_runs: ClassVar[bool] = False
    stages: ClassVar[frozenset[str]] = frozenset({"vision", "input", "layer"})
    # capture sources (vtprune.signals.SOURCES) this family's hooks can serve; [CLS]-only signals also need has_cls
    sources: ClassVar[frozenset[str]] = frozenset(SOURCES)
    has_cls: ClassVar[bool] = False
    mrope: ClassVar[bool] = False  # multi-row (M-RoPE) position ids
    video: ClassVar[Any] = None  # the family's vtprune.video.inputs.VideoFormat, if its processors take videos
    tested_transformers: ClassVar[str] = "5.19 ... 5.25"  # the range CI runs (vtprune/compat.py)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        inner = getattr(model, "model", None)
        self.vlm: nn.Module = inner if inner is not None and hasattr(inner, "language_model") else model
        self.config = self.vlm.config

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    # ------------------------------------------------------------------ structure
    @property
    def language_model(self) -> nn.Module:
        return self.vlm.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def attention_layers(self) -> frozenset[int]:
        """Decoder layers with softmax attention (in-LLM methods score from their q / k). Default: all."""
        return frozenset(range(self.num_layers))

    def layer_type(self, l: int) -> str:
        """The kind of decoder layer ``l`` (its per-layer masks differ by kind). Default: one kind."""
        return "full_attention"

    def mixer(self, l: int) -> nn.Module:
        """The token mixer of decoder layer ``l`` (its attention; a linear-attention block in hybrid models)."""
        return self.decoder_layers[l].self_attn

    def decoder_qk(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key: bool) -> torch.Tensor:
        """Post-RoPE queries (or keys) (B, H, T, d) of decoder attention ``attn`` for its normed input x (B, T, D)
        and rotary tables cos / sin (B, T, r)."""
        proj, norm = (attn.k_proj, "k_norm") if key else (attn.q_proj, "q_norm")
        y = proj(x).view(*x.shape[:2], -1, attn.head_dim)  # (B, T, H, d)
        if hasattr(attn, norm):
            y = getattr(attn, norm)(y)
        return apply_rope(y.transpose(1, 2), cos, sin)

    @property
    def projector(self) -> nn.Module:
        return self.vlm.multi_modal_projector

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_tower

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def token_id(self, modality: str) -> int:
        return getattr(self.config, self.modalities[modality][1])

    def attn_implementation(self) -> str:
        return str(getattr(self.language_model.config, "_attn_implementation", "sdpa"))

    def visual_masks(self, input_ids: torch.Tensor | None,
                     inputs_embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """modality -> (B, L) bool placeholder positions, computed before features are scattered."""
        out = {}
        for modality in self.modalities:
            tid = self.token_id(modality)
            if input_ids is not None:
                out[modality] = input_ids == tid
            elif inputs_embeds is not None:  # the same rule transformers' get_placeholder_mask uses
                emb = self.vlm.get_input_embeddings()(torch.tensor(tid, device=inputs_embeds.device))
                out[modality] = (inputs_embeds == emb).all(-1)
        return out

    # ------------------------------------------------------------------ vision tower
    def vit_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def num_vit_layers(self) -> int:
        """Layers of the vision tower as its config defines them (vit_layer indices count these)."""
        return len(self.vit_layers())

    def feature_hidden_index(self, vit_layer: int | None) -> int:
        """Normalised hidden-states index (0 = embeddings) of ``vit_layer`` (None: the feature layer)."""
        n = self.num_vit_layers()
        # a config without a feature layer (Gemma, SmolVLM) feeds the projector the last one (then post-layernorm)
        layer = getattr(self.config, "vision_feature_layer", n) if vit_layer is None else vit_layer
        if isinstance(layer, (list, tuple)):  # multi-layer features: score with the deepest one
            layer = max(li % (n + 1) for li in layer)
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"vit_layer={layer} is out of range for a {n}-layer vision tower (use -{n + 1}..{n})")
        return layer % (n + 1)

    def vit_attention(self, vit_layer: int | None) -> nn.Module:
        """The self-attention module of the ViT layer that produces hidden state ``vit_layer``."""
        h = self.feature_hidden_index(vit_layer)
        if h == 0:
            raise ValueError("vit_layer selects the patch embeddings, which have no attention; choose a layer >= 1")
        return self.vit_layers()[h - 1].self_attn

    def bypasses_hooks(self, module: nn.Module) -> bool:
        """Whether calling ``module`` skips its forward hooks (the host then wraps its ``forward``)."""
        return False

    def vit_heads(self, vit_layer: int | None) -> tuple[int, int]:
        """(heads, head dim) of the ViT attention layer ``vit_layer``."""
        attn = self.vit_attention(vit_layer)
        return attn.num_heads, attn.head_dim

    def vit_attention_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """What a ViT signal reads from the call of the module ``vit_attention`` returns: its normed input "x",
        plus "cu_seqlens" / "position_embeddings" for packed towers (hosts whose attention takes rotated q / k
        capture those instead)."""
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return {"x": x.detach(), "cu_seqlens": kwargs.get("cu_seqlens"),
                "position_embeddings": kwargs.get("position_embeddings")}

    # Each takes the ViT attention module and what was captured at its input ({"x": normed input, plus
    # "cu_seqlens" / "position_embeddings" for packed towers}) and returns one row per ViT row of the
    # record (the units ``ImageLayout.src`` counts).
    def cls_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        """(n_vit,) head-mean attention of the [CLS] query to every ViT token."""
        raise NotImplementedError(f"{type(self).__name__} has no [CLS] token")

    def received_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        """(n_vit,) attention each ViT token receives, averaged over the queries of its image and heads."""
        raise NotImplementedError

    def vit_keys(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        """(n_vit, Dk) keys (heads concatenated) of a ViT attention layer."""
        raise NotImplementedError

    def vit_cls(self, record: VisionRecord, hidden: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """(..., Dv) the [CLS] hidden state (of a ViT layer's output ``hidden``) of each token's tile."""
        raise NotImplementedError(f"{type(self).__name__} has no [CLS] token")

    def padding_fraction(self, record: VisionRecord) -> torch.Tensor:
        """(n_vit,) fraction of each ViT row's patch that is pad-to-square fill (0 where not applicable)."""
        return torch.zeros(record.n_vit)

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        """Map a per-ViT-row signal (n_vit, C) onto LLM tokens: one (n_i, C) tensor per image of
        ``record.produced``. ``kind`` is "score" (attention mass: pooled tokens add or pool their patches'
        scores) or "feature" (pooled tokens concatenate or pool their patches' vectors). Default: each
        token reads its ``src`` row (structural tokens read zeros); adapters whose tokens merge several ViT
        rows override this with the model's own pooling."""
        out = []
        for im in record.produced:
            src = im.src.to(rows.device)
            out.append(rows[src.clamp(min=0)].masked_fill((src < 0)[:, None], 0))
        return out

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """(..., Dfeat) projector inputs of LLM tokens given their ViT source rows ``src`` and their index
        ``local`` among the record's tokens (the projector may run before packing or after pooling)."""
        feats = record.stash["features"]  # (n_tiles, P, Dv)
        T, P = record.tokens_per_tile, record.features_per_tile
        rows = (src // T) * P + (src % T) - (T - P)  # projector-input row of each ViT token
        return feats.reshape(-1, feats.shape[-1])[rows.to(feats.device)]

    def projector_fn(self) -> Projector:
        """The projector as a callable on (..., Dfeat) vision features (see ``vit_feature_rows``), with its
        structure (:meth:`projector_parts`)."""
        return Projector(self.projector, self.projector_parts())

    def projector_parts(self) -> ProjectorMLP | None:
        """The projector's [norm ->] Linear -> activation -> Linear structure (zeroth_order's closed form), or
        None when it is something else."""
        return None

    # ------------------------------------------------------------------ layout
    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        """Fill ``record`` from one feature call of ``modality`` (its arguments and output)."""
        raise NotImplementedError

    def default_layouts(self, modality: str, n_visual: int) -> VisionRecord | None:
        """A layout when no feature call was seen (features passed in precomputed)."""
        return None

    def image_spans(self, image: torch.Tensor, visual: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, L) long: the image (the span of a ``per_image`` budget) of every placeholder, -1 elsewhere, numbered
        in prompt order across the batch. ``image``: the feature calls' images as placed; ``visual`` (B, L) bool:
        the placeholders; ``input_ids`` (B, L): the prompt, None when the model got embeddings. Default: the
        feature calls' images, or with ``images_are_runs`` one image per contiguous run of placeholders."""
        if not self.images_are_runs:
            return image
        B, L = visual.shape
        start = visual & ~torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=visual.device), visual[:, :-1]], 1)
        run = torch.cumsum(start.reshape(-1).long(), 0).reshape(B, L) - 1
        return torch.where(visual, run, -1)

    def grid_boxes(self, groups: int, image_size: tuple[int, int], processor: Any = None) -> list[GridBox]:
        """Where the ``groups`` grids of one image or video frame lie in its ``(width, height)`` picture, for
        drawing (``vtprune show``). Default: every grid shows the picture as the image processor does (its
        centre crop or pad-to-square canvas, when it does either), each on its own panel."""
        box = seen_box(processor, image_size)
        return [GridBox("" if groups == 1 else f"grid {g}", box) for g in range(groups)]

    # ------------------------------------------------------------------ cutting the language model's inputs
    def takes_mask(self, mask: Any) -> bool:
        """Whether the language model's ``attention_mask`` in prefill is one vtprune can cut (default: 2-D)."""
        return torch.is_tensor(mask) and mask.dim() == 2

    def padding_mask(self, mask: Any, embeds: torch.Tensor, vlm_kwargs: dict) -> torch.Tensor:
        """(B, L) long padding mask of the LLM input (ones when the caller gave none). ``vlm_kwargs``: what the
        VLM's forward was given (a family whose LLM gets a built mask reads the caller's 2-D mask there)."""
        if mask is None:
            return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return mask.long()

    def cut_llm_input(self, embeds: torch.Tensor, kwargs: dict, index: torch.Tensor, valid: torch.Tensor,
                      mask0: torch.Tensor, vlm_kwargs: dict) -> dict[str, Any]:
        """The language model's keyword arguments after keeping tokens ``index`` (B, L0) of its input
        (``valid`` (B, L0): False on padding slots) in prefill. ``embeds`` (B, L, D): the input embeddings
        (merged values written in); ``mask0`` (B, L): the 2-D padding mask (ones when the caller gave none).
        Default: embeddings, the 2-D mask and position ids (1-D or M-RoPE rows, kept ORIGINAL) in one gather,
        plus :meth:`extra_lm_inputs`. Override for a family whose LLM takes other sequence-aligned inputs."""
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[:2])
        new = cut_llm_input(embeds, index, valid, mask0, positions, kwargs.get("attention_mask"))
        new.update(self.extra_lm_inputs(kwargs, index, valid))
        return new

    def cut_decode_mask(self, kwargs: dict, base_mask: torch.Tensor, orig_len: int, has_pads: bool,
                        new_tokens: int, vlm_kwargs: dict) -> Any:
        """The language model's attention mask of a decode step (its kwargs: ``kwargs``) over a cache holding the
        kept prompt tokens (``base_mask`` (B, L0)) and ``new_tokens`` since, this step's included. Default: the
        2-D mask generate() keeps for the full sequence, its prompt part replaced by the kept prefix's."""
        return decode_mask(kwargs.get("attention_mask"), base_mask, orig_len, has_pads, new_tokens)

    def cut_layer_mask(self, l: int, mask: Any, cut: LayerCut) -> Any:
        """The attention mask of decoder layer ``l`` behind an in-LLM step (``mask``: what the model computed for
        that layer over the LLM input (prefill) or the full cache (decode); ``cut``: where the layer's tokens
        come from). Default: a 4-D (or sdpa's None) mask cut to the kept queries and keys; a padding mask built
        where pruning added padding slots."""
        if mask is not None:
            return take_mask(mask, cut.kv_index, cut.kv_valid, q_index=cut.q_index)
        if bool((~cut.kv_valid).any()):
            return build_mask(self.attn_implementation(), cut.kv_valid.to(cut.hidden.device), cut.hidden.shape[1],
                              cut.hidden.dtype)
        return None

    def extra_lm_inputs(self, kwargs: dict, index: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        """Sequence-aligned LLM kwargs to cut beyond embeddings / mask / positions (e.g. DeepStack)."""
        return {}

    def install_extra(self, engine: Any, patcher: Any) -> None:
        """Family-specific hooks beyond the shared ones (e.g. Qwen3-VL's DeepStack injection)."""

    # ------------------------------------------------------------------ tiny test models (vtprune.testing.tiny)
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        """(config, model class) of a tiny random model of this family (widths 32 / 64, 2-layer vision tower;
        token ids from :mod:`vtprune.testing.tiny`)."""
        raise NotImplementedError(f"{cls.__name__} has no tiny test model")

    @classmethod
    def tiny_init(cls, model: nn.Module, generator: torch.Generator) -> None:
        """Weights the random initialisation leaves degenerate in a tiny model (e.g. a zero-initialised
        projection), given values from ``generator``."""

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """One image of a tiny prompt: its placeholder tokens and its pixel inputs (batch dim 1)."""
        raise NotImplementedError(f"{type(self).__name__} has no tiny test inputs")

    def tiny_video(self, frames: int, image_size: tuple[int, int],
                   seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """One video of a tiny prompt: its placeholder tokens and its pixel inputs."""
        raise ValueError(f"make_inputs: {self.family} takes no video")

    def tiny_batch(self, input_ids: torch.Tensor, images: list[dict[str, torch.Tensor]],
                   videos: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The family's model inputs beyond ``input_ids`` / ``attention_mask``: the rows' pixel inputs batched."""
        out: dict[str, Any] = {}
        for parts in (images, videos):
            for key in parts[0] if parts else ():
                out[key] = torch.cat([p[key] for p in parts])
        return out

    # ------------------------------------------------------------------ extension points
    @property
    def compact_refusal(self) -> str | None:
        """Why ``positions="compact"`` is not defined for this family (None: it is)."""
        return "it uses M-RoPE (compact positions are defined for 1-D RoPE only)" if self.mrope else None

    def check(self, methods: list, positions: str) -> None:
        """Family-specific refusals at ``prune()`` time (raise ValueError naming method and model)."""
        if positions == "compact" and self.compact_refusal:
            raise ValueError(f"positions='compact' is not defined for {self.family}: {self.compact_refusal}")
