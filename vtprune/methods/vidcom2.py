"""VidCom2 (Video Compression Commander): more tokens for the frames that stand out, and in each frame the
tokens least like their video and their frame.

Paper: Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language
Models", EMNLP 2025, arXiv 2505.14454. Official code: xuyang-liu16/VidCom2 (``token_compressor/vidcom2/
vidcom2.py``, commit 944a17d). Reference for the count and every operation: vLLM 0.32.0,
``vllm/multimodal/video_prune/vidcom2.py`` (adapted from the official code), read in the 0.32.0 wheel
(commit 5df63a720); vLLM runs it on Qwen3-VL videos with ``--video-pruning-method vidcom2``.

A video of T frames of h x w tokens is one span. In the half of the channels with the lowest variance over the
video, tokens are L2-normalised and scored by a sum of Gaussian kernels (bandwidths 2^-3 .. 2) to the video's mean
(v) and to their frame's mean (f). Frames whose tokens are least like the video get more: frame t keeps
round(tpf * min(1, b (1 + p_t - mean p))) tokens, p = softmax(-mean_t(v) / 0.01), b = 1 - ratio (at least one
token); in each frame the tokens of lowest v + f stay; then the video is brought to exactly
``max(T, int(n (1 - ratio)))`` tokens by dropping the highest / adding the lowest v + f over the whole video.
Every operation runs in the tokens' own dtype, in vLLM's order. ``keep=K``: b = K / n and K tokens (at least T).

Defaults: the official code keeps 25% (``R_RATIO = 0.25``, i.e. ratio=0.75).

Differences from the reference:
  * none from vLLM's function: on the same tensor it selects the same tokens, in float32 and bfloat16
    (tests/vllm_host/test_video_prune.py imports vLLM's and compares).
  * From the official code (as vLLM): the count is exact (the official code keeps the sum of the rounded
    per-frame budgets, which differs by a few tokens), and ``ratio`` is the fraction removed (``R_RATIO`` is the
    fraction kept).
  * What is scored: the video's LLM input embeddings (the merger output; the official code's choice on every
    model). On Qwen3-VL vLLM scores the merger output joined with the three deepstack outputs.
  * An image is one frame: pruned by the same rule (vLLM prunes videos only).
  * Positions: kept tokens keep their original positions and the later text its own (the official HF code does
    the same; vLLM restarts the later text after the video's width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.methods.base import Method
from vtprune.methods.evs import video_frames
from vtprune.registry import METHODS
from vtprune.signals import Signals

ALPHAS = tuple(2.0**e for e in range(-3, 2))  # Gaussian bandwidths, ascending: the sum's order matters in bf16
LOW_VARIANCE_SHARE = 0.5
TEMPERATURE = 0.01


def gaussian_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(T, N) sum over ALPHAS of exp(-|x - centre|^2 / 2a), x (T, N, C), in x's dtype."""
    d2 = ((x - centre) ** 2).sum(dim=-1)  # (T, N)
    out = torch.exp(-d2 / (2.0 * ALPHAS[0]))
    for a in ALPHAS[1:]:
        out = out + torch.exp(-d2 / (2.0 * a))
    return out


def vidcom2_keep(x: torch.Tensor, T: int, base: float, target: int) -> torch.Tensor:
    """(T*tpf,) bool: the tokens one video keeps. x (T*tpf, D) in frame-major raster order; ``base`` the kept
    share the frame budgets scale (1 - ratio); ``target`` the exact count."""
    tpf = x.shape[0] // T
    variance = x.var(dim=0, unbiased=False)  # (D,) over the whole video
    _, low = torch.topk(variance, k=max(1, int(x.shape[-1] * LOW_VARIANCE_SHARE)), largest=False)
    frames = F.normalize(x.index_select(-1, low).view(T, tpf, low.numel()), dim=-1)  # (T, tpf, C)
    v = gaussian_similarity(frames, frames.mean(dim=(0, 1), keepdim=True))  # (T, tpf) like the video
    f = gaussian_similarity(frames, frames.mean(dim=1, keepdim=True))  # (T, tpf) like its frame
    similarity = v + f
    frame_score = -v.mean(dim=-1)  # (T,) frames unlike the video score high
    p = F.softmax((frame_score - frame_score.max()) / TEMPERATURE, dim=0)
    shares = (base * (1.0 + p - p.mean())).clamp(max=1.0)
    ks = (shares * tpf).round().long().clamp(min=1, max=tpf).tolist()  # (T,) half to even, as torch rounds
    keep = torch.zeros(T, tpf, dtype=torch.bool, device=x.device)
    for t, k in enumerate(ks):
        keep[t].scatter_(0, torch.topk(similarity[t], k=k, largest=False, sorted=False).indices, True)
    flat, sim = keep.view(-1), similarity.view(-1)
    have = sum(ks)
    if have > target:  # drop the video's most redundant kept tokens
        kept = flat.nonzero(as_tuple=False).squeeze(-1)
        flat[kept[torch.topk(sim[kept], k=have - target, largest=True, sorted=False).indices]] = False
    elif have < target:  # add its least redundant dropped ones
        free = (~flat).nonzero(as_tuple=False).squeeze(-1)
        add = torch.topk(sim[free], k=min(target - have, free.numel()), largest=False, sorted=False).indices
        flat[free[add]] = True
    return flat


@METHODS.register("vidcom2")
@dataclass(frozen=True, kw_only=True)
class VidCom2(Method):
    """VidCom2: frame budgets by uniqueness, then each frame's least redundant tokens (vLLM's function)."""

    name = "vidcom2"
    stage = "input"
    span = "video"
    requires = frozenset({"tokens", "frame"})

    def video_count(self, budget: Budget, n: int, frames: int) -> int:
        want = int(n * (1.0 - budget.ratio)) if budget.ratio is not None else budget.keep
        return max(frames, min(want, n))  # at least a token per frame

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        x, frame, budget = sig.tokens, sig.frame, sig.budget  # (S, N, D), (S, N)
        n = x.shape[1]
        out = []
        for s in range(x.shape[0]):
            T = video_frames(frame[s])
            base = 1.0 - budget.ratio if budget is not None and budget.ratio is not None else k / n
            out.append(vidcom2_keep(x[s], T, base, k).nonzero().squeeze(-1))
        return torch.stack(out)  # (S, k) in sequence order
