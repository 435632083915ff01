"""DyCoke: drop a video's near-duplicate frame tokens before the LLM (temporal token merging, TTM), then, from
decoder layer 3, keep only the visual tokens the prompt's last token attends to most.

Paper: Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models", CVPR 2025,
arXiv 2411.15024. Official code: KD-TAO/DyCoke (commit dd74634; ``llava/model/llava_arch.py`` for TTM,
``transformers`` fork ``modeling_qwen2.py`` for the KV pruning), on LLaVA-OneVision.

TTM, on a whole video of T frames of n tokens: frames pair up (0, 1), (2, 3), ...; the second of a pair keeps its
``int((1 - ratio) n)`` cells least similar (cosine) to the same cell of the first. Then in windows of four frames
starting at 0, 4, ... (while start < T - 4, the reference's bound), frame start + 2 is re-selected against frame
start the same way. Every other frame stays whole (at T = 32: 9 whole frames, 23 pruned; ratio = the reference's
``dycoke_k``, default 0.7). Nothing is averaged: the reference's "merging" keeps one token per near-duplicate.
Stage 2 (``dycoke_drop``, at ``drop_layer``, default 3 of 28 scaled to depth): the video keeps the
``int((1 - p) m)`` of its m remaining tokens the last prompt token attends to most at the layer before (recomputed
from q/k, head mean; p = 0.8).

``keep=K``: every pruned frame keeps K tokens (stage 2 still keeps (1 - p) of what reaches it).

Differences from the reference:
  * Stage 2 is decided once, in prefill, by the prompt's last token, and from then on layers >= drop_layer hold
    only the kept visual tokens in their KV cache (a memory saving the reference does not have). The reference
    re-chooses at every decode step from the NEW token's attention at layer 2, restoring dropped tokens when that
    attention changes (cosine < 0.9 to the previous step) and attending to the full cache otherwise; its prefill is
    never pruned. Per-step re-selection breaks DESIGN invariant 5 (decode steps are untouched; generate() equals an
    uncached masked forward of one sequence): each step would attend to a different key set, which no single
    masked prompt reproduces, and it needs the full cache kept and decode-time scoring. The prompt's own text after
    the video also loses the dropped keys from drop_layer on (the reference's prefill sees them).
    ``drop_layer=None`` runs TTM alone.
  * Kept tokens stay in sequence order at their original positions; the reference concatenates a pruned frame's
    tokens in order of similarity and renumbers positions.
  * An odd frame count: the last frame stays whole (the reference drops it). Its off-by-one image length (the last
    visual token never pruned in stage 2) is not reproduced.
  * Ties: the earlier token wins (the reference's ``topk`` order is unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.methods.base import LayerSpec, Method, ScoreMethod, scale_layers, topk_stable
from vtprune.methods.evs import video_frames
from vtprune.registry import METHODS
from vtprune.signals import Signals

DROP_LAYER = 3  # the reference's dycoke_l, on LLaVA-OneVision-7B's 28-layer Qwen2
REF_DEPTH = 28


def ttm_references(T: int) -> list[int | None]:
    """Per frame, the frame TTM compares it with (None: kept whole), in the reference's order of passes."""
    ref: list[int | None] = [None] * T
    for i in range(0, T - 1, 2):  # pairs: the second against the first
        ref[i + 1] = i
    for i in range(0, T - 4, 4):  # windows of four: the third against the first (bound: start < T - 4)
        ref[i + 2] = i
    return ref


def frame_keep(budget: Budget, n: int) -> int:
    """Tokens a pruned frame of n keeps."""
    return min(n, budget.keep) if budget.ratio is None else int((1 - budget.ratio) * n)


@METHODS.register("dycoke")
@dataclass(frozen=True, kw_only=True)
class DyCoke(Method):
    """DyCoke: temporal token merging of near-duplicate frames, then a drop at layer 3 (``dycoke_drop``)."""

    name = "dycoke"
    stage = "input"
    span = "video"
    requires = frozenset({"tokens", "frame"})

    drop_layer: int | str | None = "auto"  # "auto": 3 of 28 layers, scaled; None: TTM only
    p: float = 0.8  # stage 2 drops this share of the video tokens reaching drop_layer

    def validate(self) -> None:
        if self.drop_layer not in ("auto", None) and (isinstance(self.drop_layer, bool)
                                                       or not isinstance(self.drop_layer, int) or self.drop_layer < 1):
            raise ValueError(f"dycoke: drop_layer must be 'auto', None or a decoder layer >= 1, "
                             f"got {self.drop_layer!r}")
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"dycoke: p (the share stage 2 drops) must be in [0, 1), got {self.p!r}")

    def drop_at(self, num_layers: int) -> int | None:
        if self.drop_layer is None:
            return None
        K = scale_layers((DROP_LAYER,), num_layers, REF_DEPTH)[0] if self.drop_layer == "auto" else self.drop_layer
        return min(num_layers - 1, max(1, K))

    def expand(self, num_layers: int) -> list[Method]:
        K = self.drop_at(num_layers)
        return [self] if K is None else [self, DyCokeDrop(layer=K, p=self.p)]

    def video_count(self, budget: Budget, n: int, frames: int) -> int:
        if budget.is_identity or frames < 2:
            return n
        per = n // frames
        return sum(per if r is None else frame_keep(budget, per) for r in ttm_references(frames))

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        x, frame, budget = sig.tokens, sig.frame, sig.budget  # (S, N, D), (S, N)
        out = []
        for s in range(x.shape[0]):
            T = video_frames(frame[s])
            per = x.shape[1] // T
            v = x[s].float().view(T, per, -1)  # (T, per, D)
            keep = torch.ones(T, per, dtype=torch.bool, device=x.device)
            m = frame_keep(budget, per) if budget is not None else k // T
            for t, r in enumerate(ttm_references(T)):
                if r is not None:
                    sim = F.cosine_similarity(v[t], v[r], dim=-1)  # (per,) to the same cell of the reference
                    keep[t] = False
                    keep[t, topk_stable(-sim, m, owner=self.name)] = True  # the least similar stay
            out.append(keep.view(-1).nonzero().squeeze(-1))
        return torch.stack(out)  # (S, k)


@METHODS.register("dycoke_drop")
@dataclass(frozen=True, kw_only=True)
class DyCokeDrop(ScoreMethod):
    """DyCoke stage 2, decided in prefill: a video keeps int((1 - p) m) of its m tokens, those the last prompt token
    attends to most at the layer before; images pass whole. Added by ``dycoke`` (its ``drop_layer``)."""

    name = "dycoke_drop"
    stage = "layer"
    span = "video"
    pre_llm_ok = False
    scored_at_previous_layer = True
    requires = frozenset({"text_attention"})

    layer: LayerSpec = DROP_LAYER
    p: float = 0.8

    def video_count(self, budget: Budget, n: int, frames: int) -> int:
        return n if budget.is_identity or frames < 2 else int((1 - self.p) * n)  # videos only, as the reference

    def score(self, sig: Signals) -> torch.Tensor:
        return sig.text_attention("last")  # (S, N) layer K-1, head mean, over the row's keys
