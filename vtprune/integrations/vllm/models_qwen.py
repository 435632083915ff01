"""vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL with vtprune's pruning (M-RoPE, original positions through vLLM's
pruned-position path). The shared machinery is in :mod:`vtprune.integrations.vllm.models`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
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

from vtprune.integrations.vllm import positions
from vtprune.integrations.vllm.host import VllmHost
from vtprune.integrations.vllm.models import _host, _media_runs, pruning_processor


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
