"""Video frames for video VLMs: read a file, sample frames, and build the model inputs.

Three layers, each usable alone:

* **Reading** (:func:`probe`, :func:`load_video`): decord when it imports (fast random access; 0.6.0 is
  unmaintained since 2021), else PyAV (maintained, bundles FFmpeg). ``backend="auto" | "decord" | "pyav"``.
  Both are imported lazily: ``import vtprune`` never imports them.
* **Sampling** (:func:`uniform_indices`, :func:`fps_indices`): ``n`` frames spread evenly
  (``np.linspace(0, n_total - 1, n).round()``, as lmms-eval and Qwen3-VL's processor do) or one frame
  every ``1 / fps`` seconds, capped at ``max_frames`` by subsampling that grid evenly.
* **Model inputs** (:class:`FramePreprocessor`, :class:`VideoInputBuilder`): the tensors and the expanded
  prompt the transformers 5.19 ... 5.25 processors (same defaults throughout) of Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
  LLaVA-OneVision and LLaVA-NeXT-Video produce. Their *video* processors need torchvision (which cannot be
  installed next to torch 2.13.0+cpu here), so the pixel pipeline is re-implemented with PIL + torch: same resize rule,
  rescale, normalisation and (Qwen) patch layout; the placeholder expansion follows each processor's
  ``replace_video_token``. When torchvision is available, :func:`hf_processor_kwargs` gives what an HF
  processor call needs instead.

Timestamps are ``index / fps`` (the video's average frame rate), as ``transformers.VideoMetadata`` computes
them: exact for constant-frame-rate files, approximate for variable-frame-rate ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav")
#: Model families whose processors take videos (``config.model_type``).
VIDEO_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video")
QWEN_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# transformers' constants (image_utils.OPENAI_CLIP_* / IMAGENET_STANDARD_*), the video processors' defaults
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds (before sampling)."""

    path: str
    num_frames: int  # decodable frames
    fps: float  # average frame rate
    width: int
    height: int
    backend: str  # the reader that produced this ("decord" | "pyav")

    @property
    def duration(self) -> float:
        """Seconds covered by the frames: ``num_frames / fps``."""
        return self.num_frames / self.fps if self.fps > 0 else 0.0


@dataclass
class SampledVideo:
    """Frames sampled from one video.

    Attributes:
        frames: (F, H, W, 3) uint8 RGB.
        indices: (F,) int64 indices into the decoded stream, increasing.
        timestamps: (F,) float64 seconds, ``indices / info.fps``.
        info: the source file's :class:`VideoInfo`.
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    info: VideoInfo

    def __len__(self) -> int:
        return len(self.indices)

    def pil(self) -> list[Any]:
        """The frames as PIL images (what some processors and chat pipelines expect)."""
        from PIL import Image

        return [Image.fromarray(f) for f in self.frames]

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled clip (what Qwen2.5-VL's ``second_per_grid_ts`` is derived from)."""
        return len(self) / self.info.num_frames * self.info.fps if self.info.num_frames else self.info.fps

    def metadata(self) -> Any:
        """A ``transformers.video_utils.VideoMetadata`` for HF processors (Qwen3-VL needs it for timestamps)."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(total_num_frames=self.info.num_frames, fps=self.info.fps, width=self.info.width,
                             height=self.info.height, duration=self.info.duration, video_backend=self.info.backend,
                             frames_indices=self.indices.tolist())


def available_backends() -> list[str]:
    """Readers importable here, in ``auto`` preference order (decord first: it seeks by index)."""
    return [name for name, module in (("decord", "decord"), ("pyav", "av")) if importlib.util.find_spec(module)]


def resolve_backend(backend: str = "auto") -> str:
    """The concrete reader for ``backend``; raises with an install hint when none is importable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a video reader; allowed: {', '.join(map(repr, BACKENDS))}")
    found = available_backends()
    if backend == "auto":
        if not found:
            raise ImportError("no video reader is installed: pip install 'vtprune[video]' (PyAV; decord optional)")
        return found[0]
    if backend not in found:
        pkg = "av" if backend == "pyav" else "decord"
        raise ImportError(f"backend={backend!r} needs the {pkg!r} package: pip install {pkg}")
    return backend


def _check_path(path: str | os.PathLike) -> str:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"video file not found: {p}")
    return p


def _decord_reader(path: str, threads: int) -> Any:
    import decord

    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)


def _decord_info(path: str, vr: Any) -> VideoInfo:
    h, w = vr[0].shape[:2]
    return VideoInfo(path, len(vr), float(vr.get_avg_fps()), int(w), int(h), "decord")


def _pyav_count(path: str) -> int:
    """Frames of the first video stream, decoded one by one (containers such as webm store no count)."""
    import av

    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def probe(path: str | os.PathLike, backend: str = "auto", *, threads: int = 1) -> VideoInfo:
    """Frame count, average fps and size of a video file."""
    path, backend = _check_path(path), resolve_backend(backend)
    if backend == "decord":
        return _decord_info(path, _decord_reader(path, threads))
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        n, w, h = int(stream.frames or 0), stream.codec_context.width, stream.codec_context.height
    if n <= 0:
        n = _pyav_count(path)
    return VideoInfo(path, n, float(rate) if rate else 0.0, int(w), int(h), backend)


def uniform_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` frame indices spread evenly over ``n_total`` frames, first and last included: (n,) int64.

    ``n >= n_total`` returns every frame once (no duplicates).
    """
    if n_total <= 0:
        raise ValueError(f"the video has no frames (n_total={n_total})")
    if n < 1:
        raise ValueError(f"num_frames must be >= 1, got {n}")
    if n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    return np.linspace(0, n_total - 1, n).round().astype(np.int64)


def fps_indices(n_total: int, video_fps: float, fps: float, *, max_frames: int | None = None,
                min_frames: int = 1) -> np.ndarray:
    """One frame every ``1 / fps`` seconds: the frame shown at t = 0, 1/fps, 2/fps, ... (< duration): (F,) int64.

    Frame i is on screen during [i / video_fps, (i + 1) / video_fps), so the frame at time t is
    ``floor(t * video_fps)``. More than ``max_frames`` samples are thinned evenly (the cap lowers the
    effective rate, it never truncates the end of the video); fewer than ``min_frames`` fall back to
    ``uniform_indices(n_total, min_frames)``.
    """
    if fps <= 0 or video_fps <= 0:
        raise ValueError(f"fps sampling needs positive rates (fps={fps}, video fps={video_fps})")
    duration = n_total / video_fps
    n = math.ceil(duration * fps - 1e-9)  # sample times k / fps < duration
    times = np.arange(n, dtype=np.float64) / fps
    idx = np.minimum(np.floor(times * video_fps + 1e-6), n_total - 1).astype(np.int64)  # 1e-6: float noise
    idx = np.unique(idx)  # fps above the video's own rate would repeat frames
    if max_frames is not None and len(idx) > max_frames:
        idx = idx[uniform_indices(len(idx), max_frames)]
    if len(idx) < min_frames:
        idx = uniform_indices(n_total, min_frames)
    return idx


def sample_indices(info: VideoInfo, *, num_frames: int | None = None, fps: float | None = None,
                   max_frames: int | None = None, min_frames: int = 1) -> np.ndarray:
    """Indices for ``num_frames`` uniform frames or ``fps`` frames per second (exactly one of them)."""
    if (num_frames is None) == (fps is None):
        raise ValueError(f"give num_frames= or fps=, not both or neither (got {num_frames=}, {fps=})")
    if num_frames is not None:
        n = num_frames if max_frames is None else min(num_frames, max_frames)
        return uniform_indices(info.num_frames, n)
    return fps_indices(info.num_frames, info.fps, fps, max_frames=max_frames, min_frames=min_frames)


def read_frames(path: str | os.PathLike, indices: Sequence[int] | np.ndarray, backend: str = "auto", *,
                threads: int = 1) -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed): (F, H, W, 3) uint8 RGB."""
    path, backend = _check_path(path), resolve_backend(backend)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        raise ValueError("no frame indices to read")
    if backend == "decord":
        return _decord_reader(path, threads).get_batch(idx.tolist()).asnumpy()
    import av

    wanted = set(idx.tolist())
    last, got = max(wanted), {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        # PyAV cannot seek to an exact frame index reliably (seeks land on key frames, pts may be
        # irregular), so decode sequentially and convert only the wanted frames (the costly step)
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    missing = sorted(wanted - set(got))
    if missing:
        raise IndexError(f"{path}: frames {missing[:5]} are beyond the {len(got)} decodable frames")
    return np.stack([got[int(i)] for i in idx])


def load_video(path: str | os.PathLike, *, num_frames: int | None = None, fps: float | None = None,
               max_frames: int | None = None, min_frames: int = 1, backend: str = "auto",
               threads: int = 1) -> SampledVideo:
    """Probe, sample (``num_frames`` uniform xor ``fps`` per second, capped at ``max_frames``) and decode.

    Example::

        clip = load_video("a.mp4", num_frames=8)          # clip.frames: (8, H, W, 3) uint8
        clip = load_video("a.mp4", fps=1, max_frames=32)  # one frame a second, at most 32
    """
    path, backend = _check_path(path), resolve_backend(backend)
    if backend == "decord":  # one reader for probing and decoding (opening a file indexes it)
        vr = _decord_reader(path, threads)
        info = _decord_info(path, vr)
        idx = sample_indices(info, num_frames=num_frames, fps=fps, max_frames=max_frames, min_frames=min_frames)
        frames = vr.get_batch(idx.tolist()).asnumpy()
    else:
        info = probe(path, backend, threads=threads)
        idx = sample_indices(info, num_frames=num_frames, fps=fps, max_frames=max_frames, min_frames=min_frames)
        frames = read_frames(path, idx, backend, threads=threads)
    return SampledVideo(frames=frames, indices=idx, timestamps=idx / info.fps if info.fps else idx * 0.0,
                        info=info)


# ------------------------------------------------------------------------------------------ pixel values


def qwen_resize_hw(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int,
                   num_frames: int | None = None, temporal_factor: int = 2) -> tuple[int, int]:
    """Target (H, W) of a Qwen video frame: multiples of ``factor`` (patch * merge), aspect kept, area bounded.

    Qwen2/2.5-VL bound the area of ONE frame by [min_pixels, max_pixels]. Qwen3-VL (``num_frames`` given)
    bounds the whole clip, ``frames x H x W`` (frames rounded to ``temporal_factor``), and first scales
    frames smaller than ``factor`` up to it.
    """
    if num_frames is not None:
        if num_frames < temporal_factor:
            raise ValueError(f"Qwen3-VL needs at least {temporal_factor} frames, got {num_frames}")
        if min(height, width) < factor:
            up = max(factor / height, factor / width)
            height, width = int(height * up), int(width * up)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds Qwen's limit of 200")
    t = 1 if num_frames is None else round(num_frames / temporal_factor) * temporal_factor
    frames = 1 if num_frames is None else num_frames
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if t * h * w > max_pixels:  # shrink: floor keeps the area under the cap
        scale = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif t * h * w < min_pixels:  # grow: ceil reaches the floor
        scale = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def _resize(frames: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, h, w, 3) uint8 with PIL (what the transformers PIL processors use)."""
    from PIL import Image

    h, w = hw
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), resample=resample)) for f in frames])


def qwen_patchify(video: torch.Tensor, patch: int, merge: int,
                  temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(F, C, H, W) -> ((t*h*w, C*temporal*patch*patch), (t, h, w)), the Qwen ViT's packed patch layout.

    Frames are padded to a multiple of ``temporal`` by repeating the last one. Rows are ordered by
    temporal group, then merge window (raster), then patch within the window (raster): the 2x2 patches a
    merged token pools are consecutive rows. A row flattens (channel, time, y, x).
    """
    F, C, H, W = video.shape
    if pad := -F % temporal:
        video = torch.cat([video, video[-1:].expand(pad, C, H, W)])
    t, h, w = video.shape[0] // temporal, H // patch, W // patch
    if h % merge or w % merge:
        raise ValueError(f"frame {H}x{W} is not a multiple of patch*merge = {patch * merge}")
    x = video.reshape(t, temporal, C, h // merge, merge, patch, w // merge, merge, patch)
    # (t, temporal, C, Hm, my, py, Wm, mx, px) -> (t, Hm, Wm, my, mx, C, temporal, py, px)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * temporal * patch * patch), (t, h, w)


@dataclass(frozen=True)
class FramePreprocessor:
    """Sampled frames -> the pixel tensors of one family's video processor (PIL resize + torch, no torchvision).

    Attributes:
        family: a :data:`VIDEO_FAMILIES` name.
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
    mean: tuple[float, ...] = _CLIP_MEAN
    std: tuple[float, ...] = _CLIP_STD
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = 3
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if self.family not in VIDEO_FAMILIES:
            raise ValueError(f"no video preprocessing for {self.family!r}; video families: {', '.join(VIDEO_FAMILIES)}")

    @classmethod
    def defaults(cls, family: str) -> FramePreprocessor:
        """The transformers 5.19 ... 5.25 video processor defaults of ``family`` (checkpoints override them)."""
        if family in ("qwen2_vl", "qwen2_5_vl"):
            return cls(family, {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28})
        if family == "qwen3_vl":
            return cls(family, {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}, mean=_HALF, std=_HALF,
                       patch_size=16)
        if family == "llava_onevision":
            return cls(family, {"height": 384, "width": 384})
        if family == "llava_next_video":
            return cls(family, {"shortest_edge": 224}, crop_size=(224, 224))
        raise ValueError(f"no video preprocessing for {family!r}; video families: {', '.join(VIDEO_FAMILIES)}")

    @classmethod
    def from_dict(cls, family: str, cfg: dict[str, Any]) -> FramePreprocessor:
        """From a ``video_preprocessor_config.json`` (or ``preprocessor_config.json``) dict."""
        base = cls.defaults(family)
        size = dict(cfg.get("size") or base.size)
        if "min_pixels" in cfg and cfg["min_pixels"]:  # legacy Qwen keys win, as in the HF processors
            size["shortest_edge"] = cfg["min_pixels"]
        if "max_pixels" in cfg and cfg["max_pixels"]:
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
        """Preprocessing sized for a model's own config (used for the random tiny models, whose vision
        towers take small frames): Qwen frames of about ``side``^2 pixels (default 4 merge windows a
        side; Qwen3-VL bounds the whole clip, sized here for ``frames`` frames), LLaVA frames at the
        vision tower's ``image_size``."""
        cfg = model.config
        family, vc = cfg.model_type, cfg.vision_config
        base = cls.defaults(family)
        if family in QWEN_FAMILIES:
            factor = vc.patch_size * vc.spatial_merge_size
            side = side or 4 * factor
            area = side * side * (frames if family == "qwen3_vl" else 1)
            return cls(family, {"shortest_edge": area, "longest_edge": area}, None, base.mean, base.std,
                       patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                       merge_size=vc.spatial_merge_size)
        px = side or vc.image_size
        if family == "llava_onevision":
            return cls(family, {"height": px, "width": px}, None, base.mean, base.std)
        return cls(family, {"shortest_edge": px}, (px, px), base.mean, base.std)

    def target_hw(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        """(H, W) the frames are resized to (before any crop)."""
        if self.family in QWEN_FAMILIES:
            return qwen_resize_hw(height, width, factor=self.patch_size * self.merge_size,
                                  min_pixels=self.size["shortest_edge"], max_pixels=self.size["longest_edge"],
                                  num_frames=num_frames if self.family == "qwen3_vl" else None,
                                  temporal_factor=self.temporal_patch_size)
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        s = self.size["shortest_edge"]  # shortest edge to s, aspect kept (the long edge truncated)
        return (s, int(s * width / height)) if height <= width else (int(s * height / width), s)

    def normalise(self, frames: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, 3, H, W) float32, rescaled and normalised."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() * self.rescale_factor
        mean = torch.tensor(self.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[None, :, None, None]
        return (x - mean) / std

    def __call__(self, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """(F, H, W, 3) uint8 frames of ONE video -> the processor's tensors for it.

        Qwen: ``pixel_values_videos`` (t*h*w, 3*tp*p*p) and ``video_grid_thw`` (1, 3) = [[t, h, w]] in
        patches. LLaVA-OneVision / NeXT-Video: ``pixel_values_videos`` (1, F, 3, H, W).
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (F, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
        hw = self.target_hw(frames.shape[1], frames.shape[2], len(frames))
        frames = _resize(frames, hw, self.resample)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            if ch > frames.shape[1] or cw > frames.shape[2]:
                raise ValueError(f"crop {self.crop_size} is larger than the resized frame {frames.shape[1:3]}")
            top, left = (frames.shape[1] - ch) // 2, (frames.shape[2] - cw) // 2
            frames = frames[:, top : top + ch, left : left + cw]
        x = self.normalise(frames)
        if self.family in QWEN_FAMILIES:
            pv, thw = qwen_patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)
            return {"pixel_values_videos": pv, "video_grid_thw": torch.tensor([thw])}
        return {"pixel_values_videos": x[None]}


# ------------------------------------------------------------------------------------------ prompts + ids


def qwen3_group_times(timestamps: Sequence[float], temporal: int = 2) -> list[float]:
    """Qwen3-VL's timestamp of each temporal patch: the mean of its first and last frame's times
    (the last frame repeated to fill the final patch, as the pixels are)."""
    ts = [float(t) for t in timestamps]
    if pad := -len(ts) % temporal:
        ts += [ts[-1]] * pad
    return [(ts[i] + ts[i + temporal - 1]) / 2 for i in range(0, len(ts), temporal)]


def hf_processor_kwargs(video: SampledVideo) -> dict[str, Any]:
    """Keyword arguments for a transformers processor call on one pre-sampled video (needs torchvision):
    ``processor(text=[prompt], **hf_processor_kwargs(clip), return_tensors="pt")``."""
    return {"videos": [video.frames], "video_metadata": [video.metadata()], "do_sample_frames": False}


def _default_tokens(family: str) -> tuple[str, str | None, str | None]:
    if family in QWEN_FAMILIES:
        return "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    return "<video>", None, None


@dataclass
class VideoInputBuilder:
    """A question about a sampled video -> the ``model.generate(**inputs)`` dict of one family.

    ``from_pretrained(path)`` reads a local checkpoint's tokenizer, chat template, config and video
    preprocessor settings (no torchvision needed); :func:`tiny_builder` makes one for the random tiny
    models of ``vtprune.testing.tiny``.

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
        if self.family not in VIDEO_FAMILIES:
            raise ValueError(f"{self.family!r} takes no video; video families: {', '.join(VIDEO_FAMILIES)}")
        token, start, end = _default_tokens(self.family)
        self.video_token = self.video_token or getattr(self.tokenizer, "video_token", None) or token
        self.vision_start = self.vision_start or start
        self.vision_end = self.vision_end or end
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
        if family not in VIDEO_FAMILIES:
            raise ValueError(f"{path}: {family!r} takes no video; video families: {', '.join(VIDEO_FAMILIES)}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        pre: dict[str, Any] = {}
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (path / name).is_file():
                pre = json.loads((path / name).read_text())
                break
        kwargs: dict[str, Any] = dict(family=family, tokenizer=tokenizer,
                                      frames=FramePreprocessor.from_dict(family, pre),
                                      chat_template=_read_chat_template(path, tokenizer))
        vc = getattr(config, "vision_config", None)
        if vc is not None and not family.startswith("qwen"):
            kwargs["vit_patch"] = vc.patch_size
        if family == "llava_next_video":
            kwargs["pool_stride"] = getattr(config, "spatial_pool_stride", 2)
        kwargs.update(overrides)
        return cls(**kwargs)

    # ---- prompt

    def prompt(self, question: str) -> str:
        """The chat-formatted prompt with ONE video placeholder, ready for generation."""
        if self.chat_template:
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
        if self.family in QWEN_FAMILIES:
            return f"{self.vision_start}{self.video_token}{self.vision_end}{question}"
        return f"{self.video_token}\n{question}"

    def placeholder(self, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        """The expansion of the video placeholder for these pixels (each processor's ``replace_video_token``)."""
        tok = self.video_token
        if self.family in QWEN_FAMILIES:
            t, h, w = pixels["video_grid_thw"][0].tolist()
            per = h * w // self.frames.merge_size**2
            if self.family != "qwen3_vl":
                return tok * (t * per)
            times = qwen3_group_times(timestamps, self.frames.temporal_patch_size)
            return "".join(f"<{s:.1f} seconds>{self.vision_start}{tok * per}{self.vision_end}" for s in times[:t])
        F, _, H, W = pixels["pixel_values_videos"].shape[1:]
        gh, gw = H // self.vit_patch, W // self.vit_patch
        if self.family == "llava_onevision":  # 2x bilinear pooling (ceil), then one newline token per video
            return tok * (F * math.ceil(gh / 2) * math.ceil(gw / 2) + 1)
        return tok * (F * (gh // self.pool_stride) * (gw // self.pool_stride))  # LLaVA-NeXT-Video

    def expand(self, prompt: str, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        """Replace the prompt's single video placeholder by its expansion."""
        if prompt.count(self.video_token) != 1:
            raise ValueError(f"the prompt must hold exactly one {self.video_token!r}, "
                             f"found {prompt.count(self.video_token)}")
        body = self.placeholder(pixels, timestamps)
        if self.family == "qwen3_vl":
            # the Qwen3-VL reference processor puts each frame in its own <|vision_start|>...<|vision_end|>
            # block and consumes the pair the chat template wrapped around the placeholder
            wrapped = f"{self.vision_start}{self.video_token}{self.vision_end}"
            if wrapped in prompt:
                return prompt.replace(wrapped, body, 1)
        return prompt.replace(self.video_token, body, 1)

    # ---- inputs

    def __call__(self, video: SampledVideo, question: str | None = None, *, prompt: str | None = None,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Inputs for ``model.generate(**inputs)``: input_ids / attention_mask (1, L), the video tensors,
        and ``mm_token_type_ids`` (Qwen) / ``second_per_grid_ts`` (Qwen2.5-VL)."""
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
        out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": enc["attention_mask"]}
        pv = pixels["pixel_values_videos"]
        out["pixel_values_videos"] = pv if dtype is None else pv.to(dtype)
        if self.family in QWEN_FAMILIES:
            out["video_grid_thw"] = pixels["video_grid_thw"]
            image_token = getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"
            image_id = self.tokenizer.convert_tokens_to_ids(image_token)
            out["mm_token_type_ids"] = (ids == image_id).int() + 2 * (ids == self.video_token_id).int()
        if self.family == "qwen2_5_vl":  # seconds covered by one temporal patch, for the M-RoPE time axis
            out["second_per_grid_ts"] = torch.tensor([self.frames.temporal_patch_size / video.sampled_fps])
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


# -------------------------------------------------------------------------------------- tiny random models


def tiny_tokenizer(words: Sequence[str], family: str) -> Any:
    """A word-level tokenizer over ``words`` whose special ids match ``vtprune.testing.tiny``
    (0 pad, 1 BOS, 2 EOS, 500 image, 501 video, 502 / 503 vision start / end); words take ids 4..499
    (3 is unknown; words past the 496th map to it) and the ids left over decode as ``#<id>``, so whatever
    a random model generates reads as something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vtprune.testing import tiny

    video, start, end = _default_tokens(family)
    image = "<|image_pad|>" if family in QWEN_FAMILIES else "<image>"
    specials = {"<pad>": tiny.PAD, "<s>": tiny.BOS, "</s>": tiny.EOS, "<unk>": 3, image: tiny.IMAGE, video: tiny.VIDEO}
    if start:
        specials |= {start: tiny.VSTART, end: tiny.VEND}
    vocab = dict(specials)
    for w in dict.fromkeys(words):  # first occurrence order: deterministic for a given word list
        if w not in vocab and len(vocab) - len(specials) < tiny.IMAGE - 4:
            vocab[w] = 4 + len(vocab) - len(specials)
    for i in range(4 + len(vocab) - len(specials), tiny.IMAGE):
        vocab[f"#{i}"] = i  # never produced by encoding (the pre-tokenizer splits "#"), only by generation
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    model.decoder = decoders.WordPiece(cleanup=False)  # joins words with single spaces
    model.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"video_token": video, "image_token": image})


def tiny_words(texts: Sequence[str]) -> list[str]:
    """The word list :func:`tiny_tokenizer` needs to cover ``texts`` (plus option letters and role tags)."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = ["USER", ":", "ASSISTANT", ".", *"ABCDEFGHIJ", *"0123456789", "<", ">", "seconds"]  # + Qwen3 times
    for t in texts:
        words += [w for w, _ in split.pre_tokenize_str(t)]
    return list(dict.fromkeys(words))


def tiny_builder(model: Any, texts: Sequence[str] = (), side: int | None = None,
                 frames: int = 8) -> VideoInputBuilder:
    """A :class:`VideoInputBuilder` for a ``vtprune.testing.tiny`` model, its vocabulary covering ``texts``.

    The prompt is ``USER: <video>\\n{question} ASSISTANT:`` (Qwen: the placeholder wrapped in vision start
    / end). Frames are sized for the tiny vision towers (see :meth:`FramePreprocessor.for_model`).
    """
    cfg = model.config
    family = cfg.model_type
    video, start, end = _default_tokens(family)
    slot = f"{start}{video}{end}" if start else f"{video}\n"
    template = ("{% for m in messages %}USER: {% for p in m['content'] %}{% if p['type'] == 'video' %}" + slot +
                "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    kwargs: dict[str, Any] = {}
    if family not in QWEN_FAMILIES:
        kwargs["vit_patch"] = cfg.vision_config.patch_size
    if family == "llava_next_video":
        kwargs["pool_stride"] = cfg.spatial_pool_stride
    return VideoInputBuilder(family, tiny_tokenizer(tiny_words(texts), family),
                             FramePreprocessor.for_model(model, side, frames), chat_template=template, **kwargs)


__all__ = [
    "BACKENDS", "VIDEO_FAMILIES", "FramePreprocessor", "SampledVideo", "VideoInfo", "VideoInputBuilder",
    "available_backends", "fps_indices", "hf_processor_kwargs", "load_video", "probe", "qwen_patchify",
    "qwen_resize_hw", "read_frames", "resolve_backend", "sample_indices", "tiny_builder", "tiny_tokenizer",
    "uniform_indices",
]
