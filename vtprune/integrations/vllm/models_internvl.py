"""vLLM's InternVL (transformers' format, vLLM's ``interns1`` model) with vtprune's pruning (1-D RoPE). The shared
machinery is in :mod:`vtprune.integrations.vllm.models`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.integrations.vllm import positions
from vtprune.integrations.vllm.models import _host, _media_runs, pruning_processor


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
