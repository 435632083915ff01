"""vLLM's LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision with vtprune's pruning (1-D RoPE; original positions ride
vLLM's M-RoPE path). The shared machinery is in :mod:`vtprune.integrations.vllm.models`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
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
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.integrations.vllm import positions
from vtprune.integrations.vllm.host import VllmHost
from vtprune.integrations.vllm.models import _host, _media_runs, _plan, pruning_processor


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
