"""vLLM model classes with vtprune's pruning, registered for the architectures the plugin covers.

Each subclasses vLLM's own class and behaves exactly like it unless the model config carries a vtprune plan
(``additional_config={"vtprune": ...}``, checked at engine start). With one:

* the prompt processor gives each image the placeholder count its budget keeps (known from the image's size);
* ``embed_multimodal`` runs vLLM's encoder path with vtprune's captures, then the plan's steps
  (:class:`~vtprune.integrations.vllm.host.VllmHost`), and returns each image's kept rows, with the kept
  tokens' original offsets in extra columns when positions are original;
* ``get_mrope_input_positions`` / ``recompute_mrope_positions`` place text as if unpruned and every kept token
  at its original position (:mod:`~vtprune.integrations.vllm.positions`).

This module imports vLLM; the plugin's entry point registers it by name, so importing vtprune never does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from vtprune.integrations.vllm import positions
from vtprune.integrations.vllm.config import Plan, plan_of
from vtprune.integrations.vllm.host import VllmHost
from vtprune.integrations.vllm.runner import enable_pruning_path
from vtprune.patching import Patcher

_PLANS: dict[int, tuple[Any, Plan | None]] = {}


def _plan(hf_config: Any, architecture: str) -> Plan | None:
    """The plan on a model config, parsed once per config object."""
    hit = _PLANS.get(id(hf_config))
    if hit is None or hit[0] is not hf_config:
        hit = (hf_config, plan_of(hf_config, architecture))
        _PLANS[id(hf_config)] = hit
    return hit[1]


def pruning_processor(factory: Callable[..., Any], architecture: str, frames: Callable[[Any, str, int], int],
                      token: Callable[[Any, str], int | None], blocks_are_images: bool = False) -> Any:
    """A processor factory whose processors give each media item the placeholder count its budget keeps.
    ``frames(out_mm_kwargs, modality, item)``: the item's frames (the spans of a per-frame budget) when they are
    one run of placeholders; ``token(hf_config, modality)``: the placeholder token (None: the replacement's single
    target token); ``blocks_are_images``: a video's frame blocks are images to the HF host (InternVL), each kept
    on its own whatever the budget."""

    def build(info: Any, dummy_inputs: Any, **kwargs: Any) -> Any:
        proc = factory(info, dummy_inputs, **kwargs)
        hf_config = info.get_hf_config()
        plan = _plan(hf_config, architecture)
        if plan is None:
            return proc
        original = proc._get_prompt_updates

        def updates(mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Sequence[Any]:
            out = []
            for u in original(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
                if not isinstance(u, PromptReplacement):
                    out.append(u)
                    continue
                tok = token(hf_config, u.modality)
                if tok is None and isinstance(u.target, list) and len(u.target) == 1:
                    tok = u.target[0]
                out.append(PromptReplacement(modality=u.modality, target=u.target, replacement=_shrunk(
                    u, plan, tok, lambda i, m=u.modality: frames(out_mm_kwargs, m, i), blocks_are_images,
                    lambda i, m=u.modality: plan.adapter.structural_tokens(out_mm_kwargs[m][i]))))
            return out

        Patcher().set_attr(proc, "_get_prompt_updates", updates, what="vtprune: pruned placeholder counts")
        return proc

    return build


def _shrunk(update: PromptReplacement, plan: Plan, token: int | None, frames_of: Callable[[int], int],
            blocks_are_images: bool = False,
            structural_of: Callable[[int], int] = lambda i: 0) -> Callable[[int], Any]:
    """The replacement of ``update`` with each run of ``token`` cut to its kept count: one run is the whole item
    (its frames the spans of a per-frame budget); several runs are its frames, each a block of the prompt of its
    own (Qwen3-VL's timestamped frames), so only a per-frame budget gives each its count before the encoder runs,
    unless the blocks are separate images to the HF host (InternVL's frames)."""

    def replacement(item: int) -> Any:
        full = update.replacement(item) if callable(update.replacement) else update.replacement
        seq = full.full if isinstance(full, PromptUpdateDetails) else full
        if not isinstance(seq, list) or token not in seq:
            raise NotImplementedError(f"vtprune: the {update.modality} placeholder of this model is not a run of "
                                      f"token {token}; the plugin cannot shrink it")
        runs = _runs(seq, token)
        if len(runs) == 1:
            counts = [plan.kept_item(runs[0][1], frames_of(item), structural_of(item))]
        elif plan.config.budget != "per_frame" and not blocks_are_images:
            raise ValueError(f"vtprune: budget={plan.config.budget!r} pools the {len(runs)} frames of this "
                             f"{update.modality}, which this model lays out as separate blocks of the prompt; "
                             "vLLM needs each block's token count before the encoder runs: use budget='per_frame'")
        else:
            counts = [plan.kept(n) for _, n in runs]
        out, at = [], 0
        for (start, n), k in zip(runs, counts):
            out += seq[at:start] + [token] * k
            at = start + n
        out += seq[at:]
        if isinstance(full, PromptUpdateDetails) and full.is_embed is not None:
            return PromptUpdateDetails.select_token_id(out, token)
        return out

    return replacement


def _media_runs(input_tokens: list[int], features: list[Any], token_of: Callable[[str], int | None],
                extent_of: Callable[[Any], int]) -> list[tuple[int, int, int]]:
    """``(offset, placeholders, extent)`` of every run of placeholder tokens of the prompt's media items (an image's
    run, or each frame block of a video), sorted: what :func:`positions.prompt_positions` lays out."""
    media = []
    for f in sorted(features, key=lambda f: f.mm_position.offset):
        start, length, token = f.mm_position.offset, f.mm_position.length, token_of(f.modality)
        for s, n in _runs(input_tokens[start : start + length], token):
            media.append((start + s, n, extent_of(f)))
    return media


def _runs(seq: list[int], token: int | None) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of ``token`` in ``seq``."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(seq):
        if t != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _host(model: torch.nn.Module, vllm_config: Any, architecture: str) -> VllmHost | None:
    hf_config = vllm_config.model_config.hf_config
    if _plan(hf_config, architecture) is None:
        return None
    host = VllmHost(plan_of(hf_config, architecture, model))
    if host.plan.original_positions:
        enable_pruning_path()
    return host


# ====================================================================== LLaVA-1.5, LLaVA-NeXT
class _LlavaPruning:
    """What a LLaVA model (CLIP / SigLIP tower built up to the feature layer, 1-D RoPE) changes; mixed in before
    vLLM's class. Original positions ride vLLM's M-RoPE path (row 0 carries them, row 1 holds the image's start)."""

    vtprune: VllmHost | None
    _feature_layers: list[int] | None = None
    architecture = ""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self._install(vllm_config, prefix)

    def _install(self, vllm_config: Any, prefix: str) -> None:
        plan = _plan(self.config, self.architecture)  # type: ignore[attr-defined]
        if plan is not None:
            depth = plan.adapter.vit_depth(plan.steps)
            if depth > plan.adapter.feature_hidden_index(None):  # a signal reads a layer past the features
                self._build_tower(vllm_config, depth, prefix)
        self.vtprune = _host(self, vllm_config, self.architecture)  # type: ignore[arg-type]

    def _build_tower(self, vllm_config: Any, depth: int, prefix: str) -> None:
        from vllm.model_executor.models.clip import CLIPVisionModel
        from vllm.model_executor.models.siglip import SiglipVisionModel
        from vllm.model_executor.models.utils import maybe_prefix

        config = self.config  # type: ignore[attr-defined]
        cls = CLIPVisionModel if config.vision_config.model_type == "clip_vision_model" else SiglipVisionModel
        with self._mark_tower_model(vllm_config, "image"):  # type: ignore[attr-defined]
            self.vision_tower = cls(config.vision_config, quant_config=vllm_config.quant_config,
                                    num_hidden_layers_override=depth, require_post_norm=False,
                                    prefix=maybe_prefix(prefix, "vision_tower"))
        layer = config.vision_feature_layer
        self._feature_layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]

    def _image_pixels_to_features(self, vision_tower: Any, pixel_values: Any) -> Any:
        if self._feature_layers is None:
            return super()._image_pixels_to_features(vision_tower, pixel_values)  # type: ignore[misc]
        return vision_tower(pixel_values, select_layers=self._feature_layers,
                            feature_select_strategy=self.config.vision_feature_select_strategy)  # type: ignore

    def embed_multimodal(self, **kwargs: object) -> Any:
        host = self.vtprune
        if host is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        image_input = self._image_input(kwargs)
        if image_input is None:
            return []
        record, pixels = self._image_record(image_input)
        return self._rows(host.encode(record, lambda: self._process_image_input(image_input), pixels))  # type: ignore

    def _image_record(self, image_input: Any) -> tuple[Any, Any]:
        """The layout of the images of one encoder call, and their pixels (in the ViT's order)."""
        raise NotImplementedError

    def _image_input(self, kwargs: dict[str, Any]) -> Any:
        image_input = self._parse_and_validate_image_input(**kwargs)  # type: ignore[attr-defined]
        if image_input is not None and image_input["type"] != "pixel_values":
            raise ValueError("vtprune: this model prunes images it encodes itself; it was given precomputed "
                             f"{image_input['type']} (send the images, or serve without the vtprune config)")
        return image_input

    def _rows(self, kept: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        if not self.vtprune.plan.original_positions:  # type: ignore[union-attr]
            return [f for f, _ in kept]
        return [torch.cat([f, positions.offset_columns(torch.stack([i, i * 0, i * 0], 1), f.dtype)], 1)
                for f, i in kept]

    def _extent(self, feature: Any) -> int:
        """Placeholders of an unpruned image (what its text successors' positions skip)."""
        raise NotImplementedError

    def _token(self, modality: str) -> int:
        config = self.config  # type: ignore[attr-defined]
        return int(config.video_token_index if modality == "video" else config.image_token_index)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        media = _media_runs(input_tokens, mm_features, self._token, self._extent)
        return positions.prompt_positions(len(input_tokens), media, one_d=True)

    def recompute_mrope_positions(self, input_ids: Any, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor,
                                  num_computed_tokens: int) -> tuple[Any, torch.Tensor, int]:
        ids = torch.as_tensor(input_ids, device=mrope_positions.device)
        ph = ids.eq(self._token("image"))
        if getattr(self.config, "video_token_index", None) is not None:  # type: ignore[attr-defined]
            ph |= ids.eq(self._token("video"))
        out, pos = positions.recompute(multimodal_embeddings, mrope_positions, num_computed_tokens, ph, one_d=True)
        return out, pos, positions.decode_delta(pos, ph)


@MULTIMODAL_REGISTRY.register_processor(
    pruning_processor(_build_llava_or_pixtral_hf_processor, "LlavaForConditionalGeneration", lambda *a: 1,
                      lambda c, m: c.image_token_index),
    info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(_LlavaPruning, LlavaForConditionalGeneration, SupportsMRoPE, SupportsMultiModalPruning):
    """vLLM's LLaVA with vtprune's pre-LLM pruning."""

    architecture = "LlavaForConditionalGeneration"

    def _image_record(self, image_input: Any) -> tuple[Any, Any]:
        pixels = image_input["pixel_values"]
        return self.vtprune.adapter.record(int(pixels.shape[0])), pixels  # type: ignore[union-attr]

    def _extent(self, feature: Any) -> int:
        return self.vtprune.adapter.num_tokens(0, 0)  # type: ignore[union-attr]  # one tile, whatever the size


@MULTIMODAL_REGISTRY.register_processor(
    pruning_processor(LlavaNextMultiModalProcessor, "LlavaNextForConditionalGeneration", lambda *a: 1,
                      lambda c, m: c.image_token_index),
    info=LlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlavaNext(_LlavaPruning, LlavaNextForConditionalGeneration, SupportsMRoPE, SupportsMultiModalPruning):
    """vLLM's LLaVA-NeXT with vtprune's pre-LLM pruning: an image (base tile + AnyRes canvas) is one span, every
    ``image_newline`` kept (``newlines="all"``)."""

    architecture = "LlavaNextForConditionalGeneration"

    def _image_record(self, image_input: Any) -> tuple[Any, Any]:
        pixels = list(image_input["pixel_values"])  # (n_tiles_i, 3, px, px) each, in the ViT's order
        record = self.vtprune.adapter.record(image_input["image_sizes"].tolist(),  # type: ignore[union-attr]
                                             [int(p.shape[0]) for p in pixels])
        return record, pixels

    def _extent(self, feature: Any) -> int:
        h, w = feature.data["image_sizes"].data.tolist()
        return self.vtprune.adapter.num_tokens(w, h)  # type: ignore[union-attr]


def _onevision_frames(out_mm_kwargs: Any, modality: str, item: int) -> int:
    return int(out_mm_kwargs["video"][item]["pixel_values_videos"].data.shape[0]) if modality == "video" else 1


@MULTIMODAL_REGISTRY.register_processor(
    pruning_processor(LlavaOnevisionMultiModalProcessor, "LlavaOnevisionForConditionalGeneration", _onevision_frames,
                      lambda c, m: c.video_token_index if m == "video" else c.image_token_index),
    info=LlavaOnevisionProcessingInfo, dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class PrunedLlavaOnevision(_LlavaPruning, LlavaOnevisionForConditionalGeneration, SupportsMRoPE,
                           SupportsMultiModalPruning):
    """vLLM's LLaVA-OneVision with vtprune's pre-LLM pruning: images as LLaVA-NeXT's (``newlines="all"``), videos
    frame by frame (each frame a span) with their trailing newline kept; each video its own encoder pass."""

    architecture = "LlavaOnevisionForConditionalGeneration"
    _image_record = PrunedLlavaNext._image_record

    def _video_pixels_to_features(self, vision_tower: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._feature_layers is None:
            return super()._video_pixels_to_features(vision_tower, pixel_values)
        feats = self._image_pixels_to_features(vision_tower, pixel_values)  # the feature layer of a deeper tower
        return self.apply_pooling(self.multi_modal_projector(feats))

    def embed_multimodal(self, **kwargs: object) -> Any:
        host = self.vtprune
        if host is None:
            return super().embed_multimodal(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, inp in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inp is None:
                continue
            if inp["type"] not in ("pixel_values", "pixel_values_videos"):
                raise ValueError(f"vtprune: this model prunes the images and videos it encodes itself; it was given "
                                 f"precomputed {inp['type']} (serve them without the vtprune config)")
            if modality == "image":
                record, pixels = self._image_record(inp)
                out += tuple(self._rows(host.encode(record, lambda i=inp: self._process_image_input(i), pixels)))
                continue
            for v in inp["pixel_values_videos"]:  # (F, 3, px, px): one pass per video (frame counts differ)
                one = {"pixel_values_videos": v[None]}
                record = host.adapter.video_record(int(v.shape[0]))
                out += tuple(self._rows(host.encode(record, lambda o=one: self._process_video_pixels(o), v[None])))
        return out

    def _extent(self, feature: Any) -> int:
        adapter = self.vtprune.adapter  # type: ignore[union-attr]
        if feature.modality == "video":
            return adapter.video_record(int(feature.data["pixel_values_videos"].data.shape[0])).images[0].num_tokens
        h, w = feature.data["image_sizes"].data.tolist()
        return adapter.num_tokens(w, h)


# ====================================================================== Qwen2-VL, Qwen2.5-VL
def _qwen_frames(out_mm_kwargs: Any, modality: str, item: int) -> int:
    return int(out_mm_kwargs[modality][item][f"{modality}_grid_thw"].data[0]) if modality == "video" else 1


def _qwen_token(hf_config: Any, modality: str) -> int:
    return int(hf_config.video_token_id if modality == "video" else hf_config.image_token_id)


class _QwenPruning:
    """What a Qwen-VL model (M-RoPE, merged 2x2 tokens, images and videos) changes; mixed in before vLLM's class
    (a plain class: vLLM's interface protocols go last, after the nn.Module)."""

    vtprune: VllmHost | None

    def embed_multimodal(self, **kwargs: object) -> Any:
        host = self.vtprune
        if host is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        out: tuple[torch.Tensor, ...] = ()
        for key, inp in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inp is None:
                continue
            modality = {"images": "image", "videos": "video"}.get(key, key)  # Qwen2-VL's keys are plural
            if inp["type"] not in ("pixel_values", "pixel_values_videos"):
                raise ValueError("vtprune: this model prunes images and videos it encodes itself; it was given "
                                 f"precomputed {inp['type']}")
            grid = inp[f"{modality}_grid_thw"]
            record = host.adapter.record(grid, modality)
            run = (lambda i=inp: self._process_image_input(i)) if modality == "image" else \
                (lambda i=inp: self._process_video_input(i))
            pixels = inp.get("pixel_values" if modality == "image" else "pixel_values_videos")
            per_item = pixels.split(grid.prod(-1).tolist()) if torch.is_tensor(pixels) else None
            kept = host.encode(record, run, per_item)
            for (f, idx), lay, tf in zip(kept, record.images, self._t_factors(inp, modality)):
                g = lay.grid.to(idx.device)[idx]  # (k, 3): frame, row, col in the merged grid
                offs = torch.stack([(g[:, 0].double() * tf).long(), g[:, 1], g[:, 2]], 1)
                out += (torch.cat([f, positions.offset_columns(offs, f.dtype)], 1),)
        return out

    def _t_factors(self, inp: Any, modality: str) -> list[float]:
        """Temporal position step per frame of each item (Qwen2.5-VL: seconds per grid x tokens per second)."""
        n = int(inp[f"{modality}_grid_thw"].shape[0])
        if modality == "image":
            return [1.0] * n
        tps = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        secs = inp.get("second_per_grid_ts")
        return [tps * float(s) for s in secs.tolist()] if secs is not None else [1.0] * n

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        if self.vtprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore[misc]
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = []
        for f, (offset, t, h, w, tf) in zip(feats, self.iter_mm_grid_thw(feats)):
            extent = max(int((t - 1) * tf), h - 1, w - 1) + 1  # transformers' get_rope_index: max(t, h, w) + 1
            media.append((offset, f.mm_position.length, extent))
        return positions.prompt_positions(len(input_tokens), media, one_d=False)

    def recompute_mrope_positions(self, input_ids: Any, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor,
                                  num_computed_tokens: int) -> tuple[Any, torch.Tensor, int]:
        ids = torch.as_tensor(input_ids, device=mrope_positions.device)
        ph = ids.eq(self.config.image_token_id) | ids.eq(self.config.video_token_id)
        out, pos = positions.recompute(multimodal_embeddings, mrope_positions, num_computed_tokens, ph, one_d=False)
        return out, pos, positions.decode_delta(pos, ph)


@MULTIMODAL_REGISTRY.register_processor(
    pruning_processor(Qwen2_5_VLMultiModalProcessor, "Qwen2_5_VLForConditionalGeneration", _qwen_frames, _qwen_token),
    info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PrunedQwen2_5_VL(_QwenPruning, Qwen2_5_VLForConditionalGeneration, SupportsMultiModalPruning):
    """vLLM's Qwen2.5-VL with vtprune's pre-LLM pruning of images and videos (original M-RoPE positions)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = _host(self, vllm_config, "Qwen2_5_VLForConditionalGeneration")


@MULTIMODAL_REGISTRY.register_processor(
    pruning_processor(Qwen2VLMultiModalProcessor, "Qwen2VLForConditionalGeneration", _qwen_frames, _qwen_token),
    info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder)
class PrunedQwen2VL(_QwenPruning, Qwen2VLForConditionalGeneration, SupportsMultiModalPruning):
    """vLLM's Qwen2-VL with vtprune's pre-LLM pruning of images and videos (original M-RoPE positions)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = _host(self, vllm_config, "Qwen2VLForConditionalGeneration")


@MULTIMODAL_REGISTRY.register_processor(
    pruning_processor(Qwen3VLMultiModalProcessor, "Qwen3VLForConditionalGeneration", _qwen_frames, _qwen_token),
    info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder)
class PrunedQwen3VL(_QwenPruning, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with vtprune's pre-LLM pruning of images and videos (original M-RoPE positions). A video's
    frames are blocks of their own (``<t seconds><|vision_start|>...<|vision_end|>``), each placed like an image
    (transformers' get_rope_index gives every frame t = 0 after its own timestamp), so the budget is per frame."""

    def __init__(self, *, vllm_config: Any, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = _host(self, vllm_config, "Qwen3VLForConditionalGeneration")

    def _t_factors(self, inp: Any, modality: str) -> list[float]:
        return [0.0] * int(inp[f"{modality}_grid_thw"].shape[0])  # every frame block starts its own t

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        if self.vtprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size

        def extent(f: Any) -> int:  # transformers' get_rope_index: max(t, h, w) + 1, every frame block with t = 0
            _, h, w = f.data[f"{f.modality}_grid_thw"].data.tolist()
            return max(h, w) // merge

        media = _media_runs(input_tokens, mm_features, lambda m: _qwen_token(self.config, m), extent)
        return positions.prompt_positions(len(input_tokens), media, one_d=False)


# ====================================================================== InternVL
@MULTIMODAL_REGISTRY.register_processor(
    pruning_processor(InternS1MultiModalProcessor, "InternVLForConditionalGeneration", lambda *a: 1,
                      lambda c, m: c.image_token_id if m == "image" else None, blocks_are_images=True),
    info=InternS1ProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder)
class PrunedInternVL(InternS1ForConditionalGeneration, SupportsMRoPE, SupportsMultiModalPruning):
    """vLLM's InternVL (HF-native format) with vtprune's pre-LLM pruning: each image's run of tile tokens is one
    span; a video's frames (``Frame1: <img>...</img>``, one tile each) are separate images, as transformers' processor
    makes them. 1-D RoPE: original positions ride vLLM's M-RoPE path, as for LLaVA."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = _host(self, vllm_config, "InternVLForConditionalGeneration")
        self._video_token: int | None = None  # vLLM's InternVL gives video frames their own token (from the inputs)

    def embed_multimodal(self, **kwargs: object) -> Any:
        host = self.vtprune
        if host is None:
            return super().embed_multimodal(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        per_tile = self.num_image_token
        for key, inp in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inp is None:
                continue
            if inp["type"] not in ("pixel_values", "pixel_values_videos"):
                raise ValueError(f"vtprune: InternVL prunes the images and videos it encodes itself; got precomputed "
                                 f"{inp['type']} (serve them without the vtprune config)")
            counts = [int(n) for n in inp["num_patches"]]  # tiles of each image, frames of each video
            spans = counts if key == "images" else [1] * sum(counts)  # a frame is an image of one tile

            def run(i: Any = inp, video: bool = key == "videos") -> list[torch.Tensor]:
                items = self._process_vision_input(i)
                return [f for x in items for f in x.split(per_tile)] if video else list(items)

            record = host.adapter.record(spans, "image" if key == "images" else "video")
            kept = host.encode(record, run, list(inp["pixel_values"].split(spans)))
            rows = [torch.cat([f, positions.offset_columns(torch.stack([i, i * 0, i * 0], 1), f.dtype)], 1)
                    if host.plan.original_positions else f for f, i in kept]
            if key == "videos":  # a video's frames, back into one item
                ends = torch.tensor(counts).cumsum(0).tolist()
                rows = [torch.cat(rows[e - n : e]) for e, n in zip(ends, counts)]
            out += tuple(rows)
        return out

    def _token(self, modality: str, feature: Any = None) -> int:
        if modality == "video" and feature is not None:
            self._video_token = int(feature.data["video_token_id"].data)
        return int(self.config.image_token_id if modality == "image" else self._video_token)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        for f in mm_features:
            self._token(f.modality, f)
        def extent(f: Any) -> int:  # an image's run is all its tiles; a frame block is one tile
            return self.num_image_token * (int(f.data["image_num_patches"].data) if f.modality == "image" else 1)

        media = _media_runs(input_tokens, mm_features, self._token, extent)
        return positions.prompt_positions(len(input_tokens), media, one_d=True)

    def recompute_mrope_positions(self, input_ids: Any, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor,
                                  num_computed_tokens: int) -> tuple[Any, torch.Tensor, int]:
        ids = torch.as_tensor(input_ids, device=mrope_positions.device)
        ph = ids.eq(self.config.image_token_id)
        if self._video_token is not None:
            ph |= ids.eq(self._video_token)
        out, pos = positions.recompute(multimodal_embeddings, mrope_positions, num_computed_tokens, ph, one_d=True)
        return out, pos, positions.decode_delta(pos, ph)
