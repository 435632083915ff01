"""Sampled frames + a question -> the ``generate()`` inputs a family's transformers processors produce.

Their *video* processors need torchvision (which cannot be installed next to torch 2.13.0+cpu here), so the
pixel pipeline is re-implemented with PIL + torch: same resize rule, rescale, normalisation and patch layout;
the placeholder expansion follows each processor's ``replace_video_token`` (transformers 5.19 ... 5.25, whose
defaults are the same throughout). What differs by family -- defaults, resize rule, pixel packing,
placeholders, extra inputs -- is the family's :class:`VideoFormat`, held by its adapter (``Adapter.video``).
When torchvision is available, :func:`~vtprune.video.read.hf_processor_kwargs` gives what an HF processor call
needs instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.video.read import SampledVideo

# transformers' constants (image_utils.OPENAI_CLIP_* / IMAGENET_STANDARD_*), the video processors' defaults
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


def video_format(family: str) -> VideoFormat:
    """The :class:`VideoFormat` of a family (``config.model_type``), from its adapter."""
    from vtprune.registry import ADAPTERS

    fmt = getattr(ADAPTERS.get(family), "video", None) if family in ADAPTERS else None
    if fmt is None:
        raise ValueError(f"{family!r} takes no video; video families: {', '.join(video_families())}")
    return fmt


def video_families() -> tuple[str, ...]:
    """Families whose processors take videos (their adapters hold a :class:`VideoFormat`)."""
    from vtprune.registry import ADAPTERS

    return tuple(n for n in ADAPTERS.names() if getattr(ADAPTERS.get(n), "video", None) is not None)


class VideoFormat:
    """How one family's processor turns sampled frames into model inputs. The defaults describe a LLaVA-style
    processor (frames resized, stacked as ``pixel_values_videos`` (1, F, 3, H, W), ``<video>`` placeholder);
    families override what differs."""

    video_token: str = "<video>"
    image_token: str = "<image>"
    vision_start: str | None = None
    vision_end: str | None = None

    def defaults(self) -> dict[str, Any]:
        """The processor's defaults, as :class:`FramePreprocessor` fields (checkpoints override them)."""
        raise NotImplementedError

    def tiny(self, config: Any, side: int | None, frames: int) -> dict[str, Any]:
        """:class:`FramePreprocessor` fields sized for a tiny random model's config: frames at the vision
        tower's ``image_size`` (or ``side``)."""
        px = side or config.vision_config.image_size
        return {"size": {"shortest_edge": px}, "crop_size": (px, px)}

    def builder_kwargs(self, config: Any) -> dict[str, Any]:
        """:class:`VideoInputBuilder` fields read from a model config (placeholder counts depend on them)."""
        return {"vit_patch": config.vision_config.patch_size}

    def target_hw(self, pre: FramePreprocessor, height: int, width: int, num_frames: int) -> tuple[int, int]:
        """(H, W) the frames are resized to (before any crop): fixed height / width, or the shortest edge to
        ``size["shortest_edge"]`` with the aspect kept (the long edge truncated)."""
        if "height" in pre.size:
            return pre.size["height"], pre.size["width"]
        s = pre.size["shortest_edge"]
        return (s, int(s * width / height)) if height <= width else (int(s * height / width), s)

    def pack(self, pre: FramePreprocessor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(F, 3, H, W) normalised frames of one video -> the processor's tensors."""
        return {"pixel_values_videos": x[None]}

    def placeholder(self, b: VideoInputBuilder, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        """The expansion of the video placeholder for these pixels."""
        raise NotImplementedError

    def expand(self, b: VideoInputBuilder, prompt: str, body: str) -> str:
        """The prompt with its single placeholder replaced by ``body``."""
        return prompt.replace(b.video_token, body, 1)

    def extra_inputs(self, b: VideoInputBuilder, ids: torch.Tensor, pixels: dict[str, torch.Tensor],
                     video: SampledVideo) -> dict[str, torch.Tensor]:
        """Model inputs beyond ids, mask and ``pixel_values_videos``."""
        return {}


def _resize(frames: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, h, w, 3) uint8 with PIL (what the transformers PIL processors use)."""
    from PIL import Image

    h, w = hw
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), resample=resample)) for f in frames])


@dataclass(frozen=True)
class FramePreprocessor:
    """Sampled frames -> the pixel tensors of one family's video processor (PIL resize + torch, no torchvision).

    Attributes:
        family: a family that takes video (see :func:`video_families`).
        size: Qwen: ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``; LLaVA-OneVision:
            ``{"height", "width"}``; LLaVA-NeXT-Video: ``{"shortest_edge": S}`` (then ``crop_size``).
        crop_size: (H, W) centre crop after resizing, or None.
        mean, std: per-channel normalisation after scaling to [0, 1].
        patch_size, temporal_patch_size, merge_size: the Qwen ViT's patching (ignored by LLaVA families).
        resample: PIL filter (3 = bicubic, every family's default).
    """

    family: str
    size: dict[str, int]
    crop_size: tuple[int, int] | None = None
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = 3
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        video_format(self.family)  # raises for a family without video

    @property
    def format(self) -> VideoFormat:
        return video_format(self.family)

    @classmethod
    def defaults(cls, family: str) -> FramePreprocessor:
        """The transformers 5.19 ... 5.25 video processor defaults of ``family`` (checkpoints override them)."""
        return cls(family, **video_format(family).defaults())

    @classmethod
    def from_dict(cls, family: str, cfg: dict[str, Any]) -> FramePreprocessor:
        """From a ``video_preprocessor_config.json`` (or ``preprocessor_config.json``) dict."""
        base = cls.defaults(family)
        size = dict(cfg.get("size") or base.size)
        if cfg.get("min_pixels"):  # legacy Qwen keys win, as in the HF processors
            size["shortest_edge"] = cfg["min_pixels"]
        if cfg.get("max_pixels"):
            size["longest_edge"] = cfg["max_pixels"]
        crop = base.crop_size
        if "do_center_crop" in cfg and not cfg["do_center_crop"]:
            crop = None
        elif cfg.get("crop_size"):
            c = cfg["crop_size"]
            crop = (c["height"], c["width"]) if isinstance(c, dict) else (int(c), int(c))
        return cls(
            family, size, crop,
            mean=tuple(cfg.get("image_mean") or base.mean), std=tuple(cfg.get("image_std") or base.std),
            patch_size=int(cfg.get("patch_size") or base.patch_size),
            temporal_patch_size=int(cfg.get("temporal_patch_size") or base.temporal_patch_size),
            merge_size=int(cfg.get("merge_size") or base.merge_size),
            resample=int(cfg.get("resample", base.resample)),
            rescale_factor=float(cfg.get("rescale_factor", base.rescale_factor)),
        )

    @classmethod
    def for_model(cls, model: Any, side: int | None = None, frames: int = 8) -> FramePreprocessor:
        """Preprocessing sized for a model's own config (the random tiny models, whose vision towers take small
        frames; see each family's ``VideoFormat.tiny``)."""
        family = model.config.model_type
        base = cls.defaults(family)
        return replace(base, **{"crop_size": None, **video_format(family).tiny(model.config, side, frames)})

    def target_hw(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        """(H, W) the frames are resized to (before any crop)."""
        return self.format.target_hw(self, height, width, num_frames)

    def normalise(self, frames: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, 3, H, W) float32, rescaled and normalised."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() * self.rescale_factor
        mean = torch.tensor(self.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[None, :, None, None]
        return (x - mean) / std

    def __call__(self, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """(F, H, W, 3) uint8 frames of ONE video -> the processor's tensors for it (Qwen:
        ``pixel_values_videos`` (t*h*w, 3*tp*p*p) and ``video_grid_thw`` [[t, h, w]]; LLaVA families:
        ``pixel_values_videos`` (1, F, 3, H, W))."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (F, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
        frames = _resize(frames, self.target_hw(frames.shape[1], frames.shape[2], len(frames)), self.resample)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            if ch > frames.shape[1] or cw > frames.shape[2]:
                raise ValueError(f"crop {self.crop_size} is larger than the resized frame {frames.shape[1:3]}")
            top, left = (frames.shape[1] - ch) // 2, (frames.shape[2] - cw) // 2
            frames = frames[:, top : top + ch, left : left + cw]
        return self.format.pack(self, self.normalise(frames))


@dataclass
class VideoInputBuilder:
    """A question about a sampled video -> the ``model.generate(**inputs)`` dict of one family.

    ``from_pretrained(path)`` reads a local checkpoint's tokenizer, chat template, config and video
    preprocessor settings (no torchvision needed); :func:`vtprune.video.tiny_builder` makes one for the random
    tiny models of ``vtprune.testing.tiny``.

    Attributes:
        family: the model's ``config.model_type``.
        tokenizer: a transformers tokenizer holding the video placeholder token.
        frames: the pixel pipeline.
        vit_patch: LLaVA families: the ViT patch size (placeholder counts depend on it).
        pool_stride: LLaVA-NeXT-Video's ``spatial_pool_stride`` (frames are pooled by it).
        chat_template: jinja template rendering ``[{"role": "user", "content": [video, text]}]``; None
            uses ``"{video}\\n{question}"``.
    """

    family: str
    tokenizer: Any
    frames: FramePreprocessor
    vit_patch: int = 14
    pool_stride: int = 2
    chat_template: str | None = None
    video_token: str = ""
    vision_start: str | None = None
    vision_end: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fmt = self.format = video_format(self.family)
        self.video_token = self.video_token or getattr(self.tokenizer, "video_token", None) or fmt.video_token
        self.vision_start = self.vision_start or fmt.vision_start
        self.vision_end = self.vision_end or fmt.vision_end
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(self.video_token)
        if self.video_token_id is None or self.video_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no video token {self.video_token!r}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> VideoInputBuilder:
        """From a local checkpoint directory (config, tokenizer, [video_]preprocessor_config.json, chat template)."""
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        config = AutoConfig.from_pretrained(path)
        family = config.model_type
        fmt = video_format(family)
        tokenizer = AutoTokenizer.from_pretrained(path)
        pre: dict[str, Any] = {}
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (path / name).is_file():
                pre = json.loads((path / name).read_text())
                break
        template = _read_chat_template(path, tokenizer)
        kwargs: dict[str, Any] = dict(family=family, tokenizer=tokenizer, chat_template=template)
        kwargs.update(frames=FramePreprocessor.from_dict(family, pre), **fmt.builder_kwargs(config))
        kwargs.update(overrides)
        return cls(**kwargs)

    def prompt(self, question: str) -> str:
        """The chat-formatted prompt with ONE video placeholder, ready for generation."""
        if self.chat_template:
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
        if self.vision_start:
            return f"{self.vision_start}{self.video_token}{self.vision_end}{question}"
        return f"{self.video_token}\n{question}"

    def placeholder(self, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        """The expansion of the video placeholder for these pixels (each processor's ``replace_video_token``)."""
        return self.format.placeholder(self, pixels, timestamps)

    def expand(self, prompt: str, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        """Replace the prompt's single video placeholder by its expansion."""
        if prompt.count(self.video_token) != 1:
            raise ValueError(f"the prompt must hold exactly one {self.video_token!r}, "
                             f"found {prompt.count(self.video_token)}")
        return self.format.expand(self, prompt, self.placeholder(pixels, timestamps))

    def __call__(self, video: SampledVideo, question: str | None = None, *, prompt: str | None = None,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Inputs for ``model.generate(**inputs)``: input_ids / attention_mask (1, L), the video tensors and the
        family's extra inputs (Qwen: ``video_grid_thw``, ``mm_token_type_ids``; Qwen2.5-VL:
        ``second_per_grid_ts``)."""
        if (question is None) == (prompt is None):
            raise ValueError("give a question (the chat template is applied) or a ready prompt, not both")
        prompt = self.prompt(question) if prompt is None else prompt
        pixels = self.frames(video.frames)
        text = self.expand(prompt, pixels, video.timestamps)
        # as the HF processors do, let the tokenizer add its BOS, unless the chat template already wrote it
        bos = getattr(self.tokenizer, "bos_token", None)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos)))
        ids = enc["input_ids"]
        n_video = int((ids == self.video_token_id).sum())
        expected = text.count(self.video_token)
        if n_video != expected:  # a tokenizer that merges the placeholder with neighbouring text
            raise ValueError(f"tokenised prompt holds {n_video} video tokens, the expansion {expected}")
        pv = pixels["pixel_values_videos"]
        out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": enc["attention_mask"],
                                        "pixel_values_videos": pv if dtype is None else pv.to(dtype)}
        out.update(self.format.extra_inputs(self, ids, pixels, video))
        return out

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Generated ids -> text (special tokens dropped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _read_chat_template(path: Path, tokenizer: Any) -> str | None:
    """The processor's chat template (chat_template.jinja / .json), else the tokenizer's own."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)
