"""Video: reading and sampling frames (decord / PyAV, imported only when a video is read), and building the
``generate()`` inputs a family's processors produce (without torchvision).

* :mod:`~vtprune.video.read`: probe, sample (uniform or by fps), read frames.
* :mod:`~vtprune.video.inputs`: :class:`FramePreprocessor` (pixels) and :class:`VideoInputBuilder` (prompt,
  placeholder expansion, model inputs); what differs by family is its adapter's :class:`VideoFormat`.
* :mod:`~vtprune.video.tiny`: the same for the random tiny test models.
"""

from vtprune.video.inputs import FramePreprocessor, VideoFormat, VideoInputBuilder, video_families, video_format
from vtprune.video.read import (
    BACKENDS,
    SampledVideo,
    VideoInfo,
    available_backends,
    fps_indices,
    hf_processor_kwargs,
    load_video,
    probe,
    read_frames,
    resolve_backend,
    sample_indices,
    uniform_indices,
)
from vtprune.video.tiny import tiny_builder, tiny_tokenizer, tiny_words

__all__ = [
    "BACKENDS", "FramePreprocessor", "SampledVideo", "VideoFormat", "VideoInfo", "VideoInputBuilder",
    "available_backends", "fps_indices", "hf_processor_kwargs", "load_video", "probe", "read_frames",
    "resolve_backend", "sample_indices", "tiny_builder", "tiny_tokenizer", "tiny_words", "uniform_indices",
    "video_families", "video_format",
]
