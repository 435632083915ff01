"""EVS (Efficient Video Sampling): drop the video tokens that repeat the same patch of the previous frame.

Paper: Bagrov, Khvedchenia, Tymchenko et al., "Efficient Video Sampling: Pruning Temporally Redundant Tokens for
Faster VLM Inference", arXiv 2510.14624. Reference code: vLLM 0.32.0, ``vllm/multimodal/video_prune/evs.py``
(contributed by the paper's authors, vLLM PR #22980; TensorRT-LLM's ``tensorrt_llm/inputs/evs.py`` is the same
algorithm), read in the 0.32.0 wheel (commit 5df63a720); vLLM applies it to Qwen2.5-VL / Qwen3-VL videos with
``--video-pruning-rate q``.

A video of T frames of h x w tokens (Qwen: temporal patches of the merged grid) is one span. A token scores
1 - cos(x[t, i, j], x[t - 1, i, j]) in the tokens' own dtype; the first frame scores 255, so it is always kept
whole; the video keeps the highest scores (a stable sort: the earlier token wins a tie), returned in sequence
order. The count is vLLM's: ``int(n * (1 - ratio))`` of the video's n tokens, at least one frame (``keep=K``: K,
at least one frame). An image is one frame: kept whole.

Defaults: none beyond the rate (the paper's Nemotron-Nano-VL is trained at q = 0.7).

Differences from the reference:
  * none in the selection: on the same tensor it is vLLM's function, index for index, in float32 and bfloat16
    (tests/vllm_host/test_video_prune.py imports vLLM's and compares).
  * What is scored: the video's LLM input embeddings, which on Qwen2.5-VL are what vLLM scores (the merger
    output). On Qwen3-VL vLLM scores the merger output joined with the three deepstack outputs (4 x hidden);
    vtprune scores the merger output alone (as the official VidCom2 code does on Qwen3-VL).
  * Positions: kept tokens keep their original positions and the text after the video keeps its own (vtprune's
    rule); vLLM restarts that text at vision_start + 1 + the grid's width.
  * The paper describes pixel-space differences with a percentile cut; its authors' code (vLLM's) compares
    embeddings with an exact count, which this follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.methods.base import Method
from vtprune.registry import METHODS
from vtprune.signals import Signals


def video_frames(frame: torch.Tensor) -> int:
    """T, the frames of one span from its candidates' frame ids (N,), which must be T frames of equal size in
    frame order (how every family lays out a video; an image is one frame)."""
    first = frame - frame.min()
    T = int(first.max()) + 1
    n = frame.numel()
    if n % T or not torch.equal(first, torch.arange(n, device=frame.device) // (n // T)):
        raise ValueError(f"a video span must hold {T} frames of equal size in frame order; got {n} tokens laid out "
                         "otherwise (did an earlier step prune it?)")
    return T


def video_shape(frame: torch.Tensor, grid: torch.Tensor) -> tuple[int, int, int]:
    """(T, h, w) of one video span: frame ids (N,) and (group, row, col) grid (N, 3), T whole h x w frames in
    raster order."""
    T = video_frames(frame)
    h, w = int(grid[:, 1].max()) + 1, int(grid[:, 2].max()) + 1
    n = frame.numel()
    raster = ((frame - frame.min()) * h + grid[:, 1]) * w + grid[:, 2]
    if n != T * h * w or not torch.equal(raster, torch.arange(n, device=grid.device)):
        raise ValueError(f"a video span must be {T} whole {h}x{w} frames in raster order; got {n} tokens laid out "
                         "otherwise (did an earlier step prune it?)")
    return T, h, w


def evs_scores(x: torch.Tensor, T: int, h: int, w: int) -> torch.Tensor:
    """(T*h*w,) dissimilarity of each token to its patch in the previous frame, 255 for the first frame, in the
    dtype of x (T*h*w, D): vLLM's op sequence, so that ties and roundings fall alike."""
    v = x.reshape(T, h, w, x.shape[-1])  # (T, h, w, D)
    dissim = 1 - F.cosine_similarity(v[1:], v[:-1], dim=-1)  # (T-1, h, w)
    first = 255 * torch.ones_like(v[:1, :, :, 0])  # (1, h, w): frame 0 first, always
    return torch.cat([first, dissim], dim=0).reshape(-1)


@METHODS.register("evs")
@dataclass(frozen=True, kw_only=True)
class EVS(Method):
    """EVS: keep the video tokens that differ most from the same patch one frame earlier (vLLM's function)."""

    name = "evs"
    stage = "input"
    span = "video"
    requires = frozenset({"tokens", "grid", "frame"})

    def video_count(self, budget: Budget, n: int, frames: int) -> int:
        per_frame = n // max(frames, 1)
        want = int(n * (1 - budget.ratio)) if budget.ratio is not None else min(budget.keep, n)
        return max(per_frame, want)  # vLLM never keeps less than one frame

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        x, grid, frame = sig.tokens, sig.grid, sig.frame  # (S, N, D), (S, N, 3), (S, N)
        out = []
        for s in range(x.shape[0]):
            order = torch.argsort(evs_scores(x[s], *video_shape(frame[s], grid[s])), descending=True, stable=True)
            out.append(order[:k].sort().values)
        return torch.stack(out)  # (S, k)
