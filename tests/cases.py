"""The method x adapter matrix: every DESIGN invariant runs on every cell (tests/test_invariants.py).

Adding a method: nothing (``_fill_matrix`` gives every registered method a default case at each stage it
allows); add an entry to METHOD_CASES when the default does not fit. Adding a model family: nothing (its
adapter's ``tiny_config`` / ``tiny_image`` make its tiny model); every method then runs on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

import vtprune
from vtprune.testing.tiny import Row, families


@dataclass(frozen=True)
class MethodCase:
    id: str
    method: Any  # what prune() takes: a name, a method object or a list
    kwargs: dict = field(default_factory=dict)  # extra prune() kwargs (ratio / keep / layer / budget ...)
    merges: bool = False  # rewrites kept tokens' representations (the masked reference writes them too)
    video: bool = False  # acts on videos only (images pass whole): its cells are the families that take video

    def prune(self, model, **override):
        return vtprune.prune(model, self.method, **{**self.kwargs, **override})


METHOD_CASES = [
    MethodCase("random", "random", {"ratio": 0.5}),
    MethodCase("pool", vtprune.method("pool", merge="none"), {"ratio": 0.5}),
    MethodCase("pool-mean", "pool", {"ratio": 0.5}, merges=True),
    MethodCase("kcenter", "kcenter", {"ratio": 0.6}),
    MethodCase("cls_attention", "cls_attention", {"keep": 5}),
    MethodCase("fastv", "fastv", {"ratio": 0.5, "layer": 1}),
    MethodCase("kcenter@layer2", "kcenter", {"ratio": 0.5, "layer": 2}),
    MethodCase("random@layers1,2", "random", {"ratio": 0.3, "layer": (1, 2)}),
    MethodCase("cls+fastv", ["cls_attention", vtprune.method("fastv", layer=2, keep=3)], {"keep": 6}),
    MethodCase("kcenter-global", "kcenter", {"ratio": 0.75, "budget": "global"}),
    MethodCase("random-temporal", "random", {"ratio": 0.5, "budget": "temporal"}),
    MethodCase("todre", vtprune.method("kcenter", variant="todre", pivot="received"), {"ratio": 0.5}),
    MethodCase("todre_v1+drop", vtprune.method("kcenter", variant="todre_v1", drop_layer=2, tau=0.5),
               {"ratio": 0.5}),
    MethodCase("mmr", "mmr", {"ratio": 0.5}),
    MethodCase("mmr-instruction", vtprune.method("mmr", importance="instruction"), {"keep": 5}),
    MethodCase("coverage", "coverage", {"ratio": 0.6}),
    MethodCase("entropy", "entropy", {"keep": 6, "layer": 1}),
    MethodCase("zeroth_order", vtprune.method("zeroth_order", m=8), {"ratio": 0.5}),
    MethodCase("visionzip", "visionzip", {"keep": 6}, merges=True),
    MethodCase("vscan", "vscan", {"ratio": 0.5}, merges=True),  # + its stage 2 (vscan_drop) at L / 2
    MethodCase("sparsevlm", vtprune.method("sparsevlm", layer=(1, 2)), {"ratio": 0.5}, merges=True),  # recycles
    MethodCase("sparsevlm-no-recycling", vtprune.method("sparsevlm", layer=(1, 2), recycle=False), {"ratio": 0.5}),
    MethodCase("dart", vtprune.method("dart", pivots=2, text_pivots=2), {"keep": 6, "layer": 1}),
    MethodCase("transition", vtprune.method("transition", layer=(1, 2), fractions=(0.75, 0.5)), {"ratio": 0.5}),
    MethodCase("debiased", vtprune.method("debiased_attention", layer=1, coef=(-1.0,), sink=1.2), {"ratio": 0.5}),
    MethodCase("debiased-cls", vtprune.method("debiased_attention", host="cls_attention", coef=(-1.0,), sink=1.2),
               {"keep": 5}),
    # pre-LLM methods also run inside the LLM (scored on hidden states / their own signals)
    MethodCase("pool@layer1", vtprune.method("pool", merge="none", layer=1), {"ratio": 0.5}),
    MethodCase("cls_attention@layer2", "cls_attention", {"keep": 5, "layer": 2}),
    MethodCase("mmr@layer1", "mmr", {"ratio": 0.5, "layer": 1}),
    MethodCase("coverage@layer1", "coverage", {"ratio": 0.6, "layer": 1}),
    MethodCase("zeroth_order@layer1", vtprune.method("zeroth_order", m=8, layer=1), {"ratio": 0.5}),
    MethodCase("visionzip@layer1", "visionzip", {"keep": 6, "layer": 1}, merges=True),
    # EVS keeps an image whole (one frame, vLLM's rule): it acts on the families whose prompts carry a video
    MethodCase("evs", "evs", {"ratio": 0.5}, video=True),
    MethodCase("evs@layer1", "evs", {"ratio": 0.5, "layer": 1}, video=True),
    MethodCase("dycoke", "dycoke", {"ratio": 0.5}, video=True),  # + its stage 2 (dycoke_drop) at layer 1
    MethodCase("dycoke-ttm@layer1", vtprune.method("dycoke", drop_layer=None, layer=1), {"ratio": 0.5}, video=True),
    MethodCase("fastvid", "fastvid", {"ratio": 0.5}, merges=True, video=True),
    MethodCase("fastvid@layer1", "fastvid", {"ratio": 0.5, "layer": 1}, merges=True, video=True),
    MethodCase("holitom", "holitom", {"ratio": 0.5}, merges=True, video=True),  # + holitom_merge inside the LLM
    MethodCase("holitom-outside@layer1", vtprune.method("holitom", merge_layer=None, layer=1), {"ratio": 0.5},
               merges=True, video=True),
]


def _stages_covered(case: MethodCase) -> set[tuple[str, str]]:
    """(method name, "pre" | "layer") pairs a case exercises, including the steps a method expands to."""
    methods = case.method if isinstance(case.method, list) else [case.method]
    out = set()
    for m in methods:
        m = vtprune.method(m) if isinstance(m, str) else m
        if "layer" in case.kwargs and len(methods) == 1:
            m = dataclasses.replace(m, layer=case.kwargs["layer"])
        m = m.resolve(32)
        for step in m.expand(32):
            out.add((step.name, "layer" if step.layers else "pre"))
    return out


def _fill_matrix() -> None:
    """A registered method with no case at a stage it allows gets a default one, so a new method file joins
    the matrix by itself (give it an explicit case above when the default does not fit, e.g. it merges)."""
    from vtprune.registry import METHODS

    covered = set().union(*(_stages_covered(c) for c in METHOD_CASES))
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.pre_llm_ok and (name, "pre") not in covered:
            METHOD_CASES.append(MethodCase(f"{name}[default]", name, {"ratio": 0.5}))
        if cls.layer_ok and (name, "layer") not in covered:
            METHOD_CASES.append(MethodCase(f"{name}@layer1[default]", name, {"ratio": 0.5, "layer": 1}))


_fill_matrix()

ADAPTER_CASES = families()  # every registered family: a new adapter file joins the matrix by itself


def runs_on(case: MethodCase, family: str) -> bool:
    """Whether ``case`` belongs in ``family``'s row of the matrix (video-only methods: families taking video)."""
    from vtprune.testing.tiny import _adapter_class

    if family in PROMPT_VARIANTS:
        return not case.video
    return not case.video or _adapter_class(family).video is not None
ATTN = ["sdpa", "eager"]

# Two prompts of different lengths (and, for LLaVA-NeXT / Qwen, different image grids): pruning leaves
# the rows with different lengths, so the batch exercises re-padding. Qwen rows also carry a video.
ROWS = [Row(before=3, after=4, seed=0, image_size=(40, 50)), Row(before=6, after=2, seed=1, image_size=(56, 28))]
_VIDEO_ROWS = [ROWS[0], Row(before=6, after=2, seed=1, image_size=(56, 28), video_frames=4)]
# OneVision: a canvas beyond 9 tiles' worth is bilinearly down-sampled (anyres_max_9): exercise it
_ONEVISION_ROWS = [Row(before=3, after=4, seed=0, image_size=(200, 210)), _VIDEO_ROWS[1]]
# A prompt with two images (spans of one sample).
TWO_IMAGES = Row(before=2, after=3, seed=2, images=2, image_size=(30, 30))


# GLM-4.1V puts a video's frames on the image placeholder and scatters image and video features over the same
# positions: transformers takes a batch of images or of videos, never both. Its matrix row runs on videos (every
# method, a span per temporal patch); the "glm4v-images" row (PROMPT_VARIANTS) runs it again on image prompts.
_GLM4V_ROWS = [Row(before=3, after=4, seed=0, image_size=(40, 50), images=0, video_frames=4),
               Row(before=6, after=2, seed=1, image_size=(56, 28), images=0, video_frames=6)]


@dataclass(frozen=True)
class PromptVariant:
    """A second matrix row of a family, on other prompts (images only: video-only methods are not in it)."""

    family: str
    rows: tuple[Row, ...]


#: Families whose one row of the matrix cannot cover every modality (a batch holds one) get extra rows.
PROMPT_VARIANTS = {"glm4v-images": PromptVariant("glm4v", tuple(ROWS))}
#: The invariant matrix's rows: every family, then the prompt variants.
MATRIX_CASES = [*ADAPTER_CASES, *PROMPT_VARIANTS]
_VARIANT_OF: dict[int, PromptVariant] = {}  # id(model) -> its variant, for models built by build_case


def build_case(name: str, attn: str) -> torch.nn.Module:
    """The tiny model of a matrix row (a family, or a prompt variant of one, whose rows ``rows_for`` then gives)."""
    from vtprune.testing.tiny import build

    variant = PROMPT_VARIANTS.get(name)
    model = build(variant.family if variant else name, attn)
    if variant:
        _VARIANT_OF[id(model)] = variant
    return model


def rows_for(model) -> list[Row]:
    if id(model) in _VARIANT_OF:
        return list(_VARIANT_OF[id(model)].rows)
    kind = model.config.model_type
    if kind == "llava_onevision":
        return _ONEVISION_ROWS
    if kind == "glm4v":
        return _GLM4V_ROWS
    if kind == "gemma4":  # a video row where this transformers' Gemma-4 encodes videos (>= 5.25)
        from vtprune.adapters.gemma4 import Gemma4Adapter

        return _VIDEO_ROWS if Gemma4Adapter.video is not None else ROWS
    return _VIDEO_ROWS if kind.startswith("qwen") or kind == "llava_next_video" else ROWS


def visual_of(model, input_ids):
    """(B, L) bool: image and video placeholders."""
    cfg = model.config
    ids = [cfg.image_token_id] + ([cfg.video_token_id] if hasattr(cfg, "video_token_id") else [])
    return torch.isin(input_ids, torch.tensor(ids))


def is_mrope(model) -> bool:
    return model.config.model_type.startswith("qwen") or model.config.model_type == "glm4v"


def plus_two_images(model, rows: list[Row]) -> list[Row]:
    """``rows`` and TWO_IMAGES in one batch, unless the family cannot batch images with the rows' videos (GLM-4.1V)."""
    if model.config.model_type == "glm4v" and any(r.video_frames for r in rows):
        return list(rows)
    return [*rows, TWO_IMAGES]
