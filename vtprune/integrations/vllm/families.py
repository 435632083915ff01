"""vtprune's adapters over vLLM's model implementations.

Each is the Hugging Face adapter of the family (its token layout, its ViT signal formulas, its projector
structure) with the module accessors pointed at vLLM's modules. Built from the model config alone (planning
at engine start, kept counts in the prompt processor) or from the loaded model (the worker). Tensor
parallelism: every rank holds the whole projector output and vision features (after the layers' all-reduce),
the q / k weights a LLaVA ViT signal needs and the projector / merger weights are gathered once, and Qwen's rotated
q / k heads at each call, so every rank selects the same tokens.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch
import torch.nn as nn

from vtprune.adapters.base import Adapter, ImageLayout, VisionRecord
from vtprune.adapters.internvl import InternVLAdapter
from vtprune.adapters.llava import LlavaAdapter
from vtprune.adapters.llava_next import LlavaNextAdapter
from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vtprune.adapters.qwen2_5_vl import Qwen2_5VLAdapter
from vtprune.adapters.qwen2_vl import Qwen2VLAdapter
from vtprune.adapters.qwen3_vl import Qwen3VLAdapter
from vtprune.signals import ProjectorMLP

#: capture sources the vLLM host serves (no decoder ones: in-LLM methods are out of its scope)
VISION_SOURCES = frozenset({"sequence", "vit_attention", "vit_output", "projector_input", "pixels"})


def _tp_world() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except (ImportError, AssertionError, RuntimeError):  # no vLLM, or no distributed group (tests on plain modules)
        return 1


def _gather_rows(w: torch.Tensor) -> torch.Tensor:
    """The full weight of a tensor-parallel shard split along dim 0 (all ranks call this together)."""
    if _tp_world() == 1:
        return w
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(w.contiguous(), dim=0)


def _gather_cols(w: torch.Tensor) -> torch.Tensor:
    if _tp_world() == 1:
        return w
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(w.contiguous(), dim=1)


def _Linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:  # noqa: N802  (reads as a layer)
    """A plain ``nn.Linear`` over a vLLM parallel linear's (whole) weights: what the adapter formulas and
    zeroth_order's closed form take."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    with torch.inference_mode(False):  # vLLM runs under inference mode; methods cache on tensor versions
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def local_weight(layer: nn.Module) -> torch.Tensor:
    """(out_local, in_local) weight of a vLLM linear layer on this rank. Read through the layer's own kernel on an
    identity matrix (exact: one non-zero term per output), because vLLM's CPU build repacks the weights for
    oneDNN and drops ``layer.weight``."""
    w = getattr(layer, "weight", None)
    if w is not None and w.dim() == 2 and w.numel():
        return w
    n_in = int(getattr(layer, "input_size_per_partition", 0) or layer.input_size)
    dtype = getattr(layer, "params_dtype", torch.float32)
    bias = getattr(layer, "bias", None)
    dev = bias.device if bias is not None else torch.device("cpu")
    with torch.no_grad():
        return layer.quant_method.apply(layer, torch.eye(n_in, dtype=dtype, device=dev), bias=None).T.contiguous()


class _DenseAttention:
    """The q / k projections of a vLLM ViT attention with a fused ``qkv_proj`` (CLIP, SigLIP), shaped like the
    Hugging Face module the adapter's formulas take (``q_proj``, ``k_proj``, ``num_heads``, ``scale``)."""

    def __init__(self, attn: nn.Module) -> None:
        d, heads = attn.head_dim, attn.num_heads_per_partition
        w, b = local_weight(attn.qkv_proj), attn.qkv_proj.bias
        rows = heads * d  # this rank's q rows, then k rows, then v rows
        self.q_proj = _Linear(_gather_rows(w[:rows]), None if b is None else _gather_rows(b[:rows]))
        self.k_proj = _Linear(_gather_rows(w[rows : 2 * rows]), None if b is None else _gather_rows(b[rows : 2 * rows]))
        self.num_heads, self.head_dim, self.scale = attn.num_heads, d, attn.scale


class VllmAdapter(Adapter):
    """What every vLLM adapter changes: built from a config (and the model once loaded), pre-LLM stages only."""

    stages: ClassVar[frozenset[str]] = frozenset({"vision", "input"})
    sources: ClassVar[frozenset[str]] = VISION_SOURCES
    vllm_architectures: ClassVar[tuple[str, ...]] = ()
    structural: ClassVar[bool] = False  # its images carry structural tokens (AnyRes newlines)
    vit_attention_path: ClassVar[str] = "self_attn"  # a ViT layer's module whose call the ViT signals capture

    def __init__(self, hf_config: Any, model: nn.Module | None = None) -> None:  # noqa: D107
        self.model = self.vlm = model  # type: ignore[assignment]
        self.config = hf_config
        self._shims: dict[int, Any] = {}

    @property
    def num_layers(self) -> int:
        return int(self.config.get_text_config().num_hidden_layers)

    def _loaded(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("this vtprune vLLM adapter was built from a config; it has no model modules")
        return self.model

    def attn_implementation(self) -> str:
        return "vllm"

    def vit_attention(self, vit_layer: int | None) -> nn.Module:
        h = self.feature_hidden_index(vit_layer)
        if h == 0:
            raise ValueError("vit_layer selects the patch embeddings, which have no attention; choose a layer >= 1")
        if self.model is None:  # planning: the range check is all
            return None  # type: ignore[return-value]
        return operator.attrgetter(self.vit_attention_path)(self.vit_layers()[h - 1])

    def bypasses_hooks(self, module: nn.Module) -> bool:
        # vLLM's @support_torch_compile classes call self.forward from their own __call__ when not compiling
        return getattr(type(module), "_ignore_compile_vllm", None) is not None

    def structural_tokens(self, item: Any) -> int:
        """Structural tokens in the placeholders of one processed media item (its vLLM multimodal kwargs)."""
        return 0

    def signal_width(self) -> int | None:
        """Columns of the encoder's output rows that are the LLM-input token (what the signals read); the rest
        travel with the kept rows (Qwen3-VL's DeepStack features). None: all of them."""
        return None


class VllmLlava(VllmAdapter, LlavaAdapter):
    """LLaVA-1.5 as vLLM runs it (``vllm/model_executor/models/llava.py``): CLIP / SigLIP built only up to the
    feature layer, a fused ``qkv_proj``, the projector's parallel linears."""

    family = "llava"
    vllm_architectures = ("LlavaForConditionalGeneration",)

    @property
    def has_cls(self) -> bool:  # type: ignore[override]
        return self.config.vision_config.model_type == "clip_vision_model"

    @property
    def vision_tower(self) -> nn.Module:
        return self._loaded().vision_tower

    @property
    def projector(self) -> nn.Module:
        return self._loaded().multi_modal_projector

    def vit_layers(self) -> nn.ModuleList:
        return self.vision_tower.vision_model.encoder.layers

    def num_vit_layers(self) -> int:  # vLLM may build fewer (only up to the feature layer)
        return int(self.config.vision_config.num_hidden_layers)

    def vit_depth(self, steps: list) -> int:
        """The deepest ViT layer the steps' signals read (vLLM builds the tower only up to the feature layer;
        the model builds it deeper when a signal needs it)."""
        from vtprune.engine.capture import capture_points

        depths = [l for (source, l) in capture_points(self, steps) if source in ("vit_attention", "vit_output")]
        return max(depths, default=0)

    def _shim(self, attn: nn.Module) -> _DenseAttention:
        if id(attn) not in self._shims:
            self._shims[id(attn)] = _DenseAttention(attn)
        return self._shims[id(attn)]

    def cls_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        return super().cls_attention(self._shim(attn), cap, record)  # type: ignore[arg-type]

    def received_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        return super().received_attention(self._shim(attn), cap, record)  # type: ignore[arg-type]

    def vit_keys(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        return super().vit_keys(self._shim(attn), cap, record)  # type: ignore[arg-type]

    def projector_parts(self) -> ProjectorMLP | None:
        p = self.projector
        if "parts" not in self._shims:  # column-parallel linear_1 (rows sharded), row-parallel linear_2 (columns)
            l1, l2 = p.linear_1, p.linear_2
            self._shims["parts"] = ProjectorMLP(
                _Linear(_gather_rows(local_weight(l1)), None if l1.bias is None else _gather_rows(l1.bias)), p.act,
                _Linear(_gather_cols(local_weight(l2)), l2.bias))
        return self._shims["parts"]

    def projector_fn(self) -> Any:
        from vtprune.signals import Projector

        parts = self.projector_parts()
        return Projector(lambda x: parts.lin2(parts.act(parts.lin1(x))), parts)

    def num_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens of one image before pruning (the processor's count)."""
        return self.tile_tokens(self.config.vision_feature_select_strategy)[1]

    def record(self, n_images: int) -> VisionRecord:
        """The layout of one encoder call's images (all the same size: one tile each)."""
        T, P, _ = self.tile_tokens(self.config.vision_feature_select_strategy)
        record = VisionRecord(modality="image", tokens_per_tile=T, features_per_tile=P, n_vit=T * n_images)
        record.images = [self._tile_layout(i, T, P) for i in range(n_images)]
        record.produced = list(record.images)
        return record


class _ConfigOnly:
    """Stands in for a transformers VLM where the adapter reads its packing / pooling code (methods that read only
    the config), so the vLLM adapter lays images out with transformers' own code."""

    def __init__(self, config: Any, model_class: type) -> None:
        self.config, self._cls = config, model_class

    def pack_image_features(self, *args: Any, **kwargs: Any) -> Any:
        return self._cls.pack_image_features(self, *args, **kwargs)

    def apply_pooling(self, *args: Any, **kwargs: Any) -> Any:
        return self._cls.apply_pooling(self, *args, **kwargs)


class VllmLlavaNext(VllmLlava, LlavaNextAdapter):
    """LLaVA-NeXT (``vllm/model_executor/models/llava_next.py``): LLaVA-1.5's tower and projector, AnyRes tiles packed
    with one ``image_newline`` per canvas row. vLLM fixes the placeholder count before selection, so a newline's
    survival cannot depend on its row: the plugin needs ``newlines="all"``."""

    family = "llava_next"
    vllm_architectures = ("LlavaNextForConditionalGeneration",)
    structural = True

    def __init__(self, hf_config: Any, model: nn.Module | None = None) -> None:  # noqa: D107
        super().__init__(hf_config, model)
        self.vlm = _ConfigOnly(hf_config, self._hf_class())  # type: ignore[assignment]
        self._layouts: dict[tuple[int, int], Any] = {}

    @staticmethod
    def _hf_class() -> type:
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        return LlavaNextModel

    def layout_of(self, size: tuple[int, int]) -> Any:
        """The HF layout of one image of ``size`` (height, width) pixels."""
        size = (int(size[0]), int(size[1]))
        if size not in self._layouts:
            one = VisionRecord()
            self.image_layouts("image", (), {"image_sizes": [size]}, None, one)
            self._layouts[size] = one.images[0]
        return self._layouts[size]

    def structural_tokens(self, item: Any) -> int:
        return int((self.layout_of(item["image_sizes"].data.tolist()).src == -1).sum())

    def num_tokens(self, width: int, height: int) -> int:
        return self.layout_of((height, width)).num_tokens

    def record(self, image_sizes: list[tuple[int, int]], tiles: list[int]) -> VisionRecord:  # type: ignore[override]
        """The layout of one encoder call's images: ``tiles[i]`` tiles of image i went through the ViT in order."""
        T, P, _ = self.tile_tokens(self.config.vision_feature_select_strategy)
        record = VisionRecord(modality="image", tokens_per_tile=T, features_per_tile=P, n_vit=sum(tiles) * T)
        first = 0
        for size, n in zip(image_sizes, tiles):
            lay = self.layout_of(size)
            record.images.append(ImageLayout(torch.where(lay.src >= 0, lay.src + first * T, lay.src), lay.grid,
                                             lay.line, lay.frame))
            first += n
        record.produced = list(record.images)
        return record


class VllmLlavaOnevision(VllmLlavaNext, LlavaOnevisionAdapter):
    """LLaVA-OneVision (``vllm/model_executor/models/llava_onevision.py``): SigLIP (no [CLS]), AnyRes-max-9 images
    (canvases past 9 tiles bilinearly down-sampled) with a newline per canvas row, videos as 2x-pooled frames and
    one trailing newline (always kept: it closes no row)."""

    family = "llava_onevision"
    vllm_architectures = ("LlavaOnevisionForConditionalGeneration",)

    @staticmethod
    def _hf_class() -> type:
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        return LlavaOnevisionModel

    def structural_tokens(self, item: Any) -> int:
        return 1 if "pixel_values_videos" in item else super().structural_tokens(item)

    def video_record(self, frames: int) -> VisionRecord:
        """The layout of one video of ``frames`` frames (its own encoder pass: frame counts differ across videos)."""
        record = VisionRecord(modality="video")
        self.image_layouts("video", (), {"pixel_values_videos": torch.empty(1, frames, 0)}, None, record)
        record.produced = list(record.images)
        return record

    def record(self, image_sizes: list[tuple[int, int]], tiles: list[int]) -> VisionRecord:  # type: ignore[override]
        """The layout of one encoder call's images, as transformers lays them out (signals go through its packing)."""
        record = VisionRecord(modality="image")
        self.image_layouts("image", (), {"image_sizes": [tuple(s) for s in image_sizes]}, None, record)
        if sum(tiles) * record.tokens_per_tile != record.n_vit:  # vLLM pads no tiles when it batches images
            raise RuntimeError(f"vtprune: vLLM encoded {sum(tiles)} tiles for images of sizes {image_sizes}, "
                               f"transformers' layout has {record.n_vit // record.tokens_per_tile}")
        record.produced = list(record.images)
        return record


def _gather_layer(layer: nn.Module, w: torch.Tensor, dim: int) -> torch.Tensor:
    """The whole of a parallel linear's shard ``w`` (split along ``dim``); layers built with ``disable_tp`` (a
    data-parallel ViT) hold all of it already."""
    return (_gather_rows if dim == 0 else _gather_cols)(w) if getattr(layer, "tp_size", 1) > 1 else w


def _gather_heads(x: torch.Tensor) -> torch.Tensor:
    """(n, H_local, d) -> (n, H, d): this rank's heads beside the others' (tensor-parallel ViT attention)."""
    if _tp_world() == 1:
        return x
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(x.contiguous(), dim=1)


class _Scaled:
    """The one attribute of a Qwen ViT attention the adapter's formulas read besides q / k."""

    def __init__(self, scaling: float) -> None:
        self.scaling = scaling


class _VllmQwen(VllmAdapter):
    """Qwen-VL as vLLM runs it. ViT signals read the rotated q / k at the input of each block's packed attention
    kernel (vLLM's ``MMEncoderAttention``) with the segments it attends within (images, or Qwen2.5-VL's windows);
    the merger's input is the patch features in the ViT's own order (Qwen2.5-VL's windows), as in transformers."""

    sources = frozenset({"sequence", "vit_attention", "projector_input", "pixels"})
    vit_attention_path = "attn.attn"  # the packed attention kernel: its inputs are the rotated q / k

    @property
    def vision_tower(self) -> nn.Module:
        return self._loaded().visual

    @property
    def projector(self) -> nn.Module:
        return self.vision_tower.merger

    def vit_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    def num_vit_layers(self) -> int:
        return int(self.config.vision_config.depth)

    def vit_heads(self, vit_layer: int | None) -> tuple[int, int]:
        vc = self.config.vision_config
        width = vc.embed_dim if hasattr(vc, "embed_dim") else vc.hidden_size  # Qwen2-VL names the ViT width embed_dim
        return int(vc.num_heads), int(width) // int(vc.num_heads)

    def vit_attention_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        q = kwargs["query"] if "query" in kwargs else args[0]  # (1, n, H_local, d), rotated
        k = kwargs["key"] if "key" in kwargs else args[1]
        cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[3]
        if int(cu[-1]) != q.shape[1]:  # FlashInfer rescales the boundaries to element offsets (GPU only)
            raise RuntimeError(f"vtprune: the ViT attention's cu_seqlens ends at {int(cu[-1])}, not at its "
                               f"{q.shape[1]} patches; its attention backend is not supported for ViT signals")
        return {"q": _gather_heads(q[0].detach()), "k": _gather_heads(k[0].detach()), "cu_seqlens": cu}

    def _qk(self, attn: nn.Module, cap: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return cap["q"], cap["k"]

    def received_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        return super().received_attention(_Scaled(cap["q"].shape[-1] ** -0.5), cap, record)  # type: ignore[misc]

    def projector_parts(self) -> ProjectorMLP | None:
        if "parts" not in self._shims:  # Qwen2/2.5-VL: ln_q, mlp = [fc1, GELU, fc2]; Qwen3-VL: norm, fc1, act, fc2
            m = self.projector
            norm, (fc1, act, fc2) = (m.ln_q, tuple(m.mlp)) if hasattr(m, "ln_q") else \
                (m.norm, (m.linear_fc1, m.act_fn, m.linear_fc2))
            self._shims["parts"] = ProjectorMLP(
                _Linear(_gather_layer(fc1, local_weight(fc1), 0),
                        None if fc1.bias is None else _gather_layer(fc1, fc1.bias, 0)), act,
                _Linear(_gather_layer(fc2, local_weight(fc2), 1), fc2.bias), norm)
        return self._shims["parts"]

    def projector_fn(self) -> Any:
        from vtprune.adapters.qwen2_vl import MergerFn

        parts, dv = self.projector_parts(), int(self.projector.hidden_size) // self.merge**2

        def merger(x: torch.Tensor) -> torch.Tensor:  # (n * merge^2, Dv) patches -> (n, D) tokens
            return parts.lin2(parts.act(parts.lin1(parts.norm(x).reshape(-1, dv * self.merge**2))))

        return MergerFn(merger, dv, parts)  # type: ignore[arg-type]

    def record(self, grid_thw: torch.Tensor, modality: str = "image") -> VisionRecord:
        record = VisionRecord(modality=modality)
        self.image_layouts(modality, (), {f"{modality}_grid_thw": grid_thw}, None, record)  # the HF layout
        record.produced = list(record.images)
        return record


class VllmQwen2VL(_VllmQwen, Qwen2VLAdapter):
    """Qwen2-VL (``vllm/model_executor/models/qwen2_vl.py``)."""

    family = "qwen2_vl"
    vllm_architectures = ("Qwen2VLForConditionalGeneration",)


class VllmQwen2_5_VL(_VllmQwen, Qwen2_5VLAdapter):
    """Qwen2.5-VL (``vllm/model_executor/models/qwen2_5_vl.py``)."""

    family = "qwen2_5_vl"
    vllm_architectures = ("Qwen2_5_VLForConditionalGeneration",)


class VllmQwen3VL(_VllmQwen, Qwen3VLAdapter):
    """Qwen3-VL (``vllm/model_executor/models/qwen3_vl.py``): vLLM's encoder returns each token's merger output
    with its DeepStack features beside it; the signals read the first part, the kept rows carry both (the HF host
    cuts the DeepStack inputs with the same rows)."""

    family = "qwen3_vl"
    vllm_architectures = ("Qwen3VLForConditionalGeneration",)

    def signal_width(self) -> int | None:
        return int(self.config.vision_config.out_hidden_size)


class VllmInternVL(VllmAdapter, InternVLAdapter):
    """InternVL in the HF-native format (``InternVLForConditionalGeneration``, which vLLM runs as
    ``vllm/model_executor/models/interns1.py``): an image is its run of tiles (thumbnail included), one span.
    vLLM's InternViT mirrors transformers' module for module (plain ``q_proj`` / ``k_proj``, not tensor-parallel),
    so the ViT signals are transformers' formulas on vLLM's modules, and its ``pixel_shuffle`` maps them to tokens."""

    family = "internvl"
    vllm_architectures = ("InternVLForConditionalGeneration",)
    vit_attention_path = "attention"

    def num_vit_layers(self) -> int:
        return int(self.config.vision_config.num_hidden_layers)

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        per_tile, (_, g) = super().rows_to_tokens(record, rows, kind), self._shape()
        out, t = [], 0
        for im in record.produced:  # this record's images are runs of tiles already
            n = im.num_tokens // (g * g)
            out.append(torch.cat(per_tile[t : t + n]))
            t += n
        return out

    def record(self, n_tiles: list[int], modality: str = "image") -> VisionRecord:
        """The layout of one encoder call's images, ``n_tiles[i]`` tiles each (the HF layout's tiles, joined); a
        video's frames are images of one tile."""
        s, g = self._shape()
        record = VisionRecord(modality=modality, tokens_per_tile=s * s + 1, features_per_tile=g * g,
                              n_vit=sum(n_tiles) * (s * s + 1))
        t0 = 0
        for n in n_tiles:
            tiles = [ImageLayout.raster((t0 + t) * g * g + torch.arange(g * g), g, g, group=t) for t in range(n)]
            record.images.append(ImageLayout(*(torch.cat([getattr(x, f) for x in tiles])
                                               for f in ("src", "grid", "line", "frame"))))
            t0 += n
        record.produced = list(record.images)
        return record


FAMILIES: dict[str, type[VllmAdapter]] = {
    arch: cls for cls in (VllmLlava, VllmLlavaNext, VllmLlavaOnevision, VllmQwen2VL, VllmQwen2_5_VL, VllmQwen3VL,
                          VllmInternVL) for arch in cls.vllm_architectures}


def family_for(hf_config: Any, architecture: str, model: nn.Module | None = None) -> VllmAdapter:
    """The vLLM adapter of ``architecture``; a clear error for the ones the plugin does not cover."""
    cls = FAMILIES.get(architecture)
    if cls is None:
        raise ValueError(f"vtprune's vLLM plugin does not support architecture {architecture!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return cls(hf_config, model)
