"""Reading and sampling video frames with decord or PyAV (imported only when a video is read).

* **Sampling** (:func:`uniform_indices`, :func:`fps_indices`): ``n`` frames spread evenly
  (``np.linspace(0, n_total - 1, n).round()``, as lmms-eval and Qwen3-VL's processor do) or one frame
  every ``1 / fps`` seconds, capped at ``max_frames`` by subsampling that grid evenly.

Timestamps are ``index / fps`` (the video's average frame rate), as ``transformers.VideoMetadata`` computes
them: exact for constant-frame-rate files, approximate for variable-frame-rate ones.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav")


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


def hf_processor_kwargs(video: SampledVideo) -> dict[str, Any]:
    """Keyword arguments for a transformers processor call on one pre-sampled video (needs torchvision):
    ``processor(text=[prompt], **hf_processor_kwargs(clip), return_tensors="pt")``."""
    return {"videos": [video.frames], "video_metadata": [video.metadata()], "do_sample_frames": False}
