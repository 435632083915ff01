"""Small shared types: stages, signal names and the statistics a handle reports.

Shape symbols used across vtprune: B batch rows, L sequence length, S spans in one selection call,
N candidate tokens per span, K kept tokens per span, D hidden width, H heads, Dv vision width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vtprune.signals import SIGNAL_TABLE

#: Where a method acts. ``vision`` and ``input`` both drop tokens where the LLM input sequence is formed
#: (transformers checks that every placeholder gets a feature, so tokens cannot vanish earlier); they
#: differ in the signals they read: ``vision`` methods score from the vision tower, ``input`` methods
#: from the projected tokens. ``layer`` methods drop at the input of decoder layer K during prefill.
STAGES: tuple[str, ...] = ("vision", "input", "layer")

#: Every signal a method may read, in the order of the signal table (vtprune.signals.SIGNAL_TABLE).
SIGNALS: tuple[str, ...] = tuple(SIGNAL_TABLE)


@dataclass
class SpanStats:
    """One span's budget outcome at one stage."""

    row: int  # batch row
    image: int  # index of the image / video in feature order
    frame: int  # frame within a video (0 for images); -1 when the span pools frames or images
    n: int  # candidate tokens entering the stage
    kept: int  # candidate tokens that survived
    budget: int = -1  # the count the method's budget asked for (kept, unless a gate dropped the span)


@dataclass
class StageStats:
    stage: str  # "vision" | "input" | "layer:K"
    method: str
    before: list[int]  # candidate visual tokens per sample entering the stage
    after: list[int]  # ... and leaving it
    spans: list[SpanStats] = field(default_factory=list)
    select_ms: float = 0.0  # wall time of scoring + selection (CUDA synchronised)
    # per sample, the ORIGINAL positions of the visual tokens present after this stage (structural ones included)
    kept_positions: list[torch.Tensor] = field(default_factory=list)
    # per sample, the original positions of kept tokens whose representation this stage replaced (merging methods),
    # ascending, and the representations written there (M, D): the input embedding, or layer K's input
    merged_positions: list[torch.Tensor] = field(default_factory=list)
    merged_values: list[torch.Tensor] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.stage} {self.method}"


@dataclass
class PruneStats:
    """What the last prefill did. Decode steps do not change it."""

    visual_before: list[int] = field(default_factory=list)  # visual tokens per sample in the prompt
    visual_after: list[int] = field(default_factory=list)  # visual tokens per sample reaching the last layer
    stages: list[StageStats] = field(default_factory=list)
    # per sample, the ORIGINAL positions that reach the last decoder layer (text and visual), sorted
    kept_positions: list[torch.Tensor] = field(default_factory=list)
    # per sample, visual tokens processed per decoder layer averaged over layers (FastV-style "average" budget)
    mean_visual_per_layer: list[float] = field(default_factory=list)
    # first decoder layer -> per sample, the ORIGINAL positions present from that layer on (0 = LLM input)
    positions_by_layer: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # wall time spent inside vtprune's hooks for this prefill (layouts, signals, selection, cutting), ms: what
    # pruning costs beyond the model's own compute (the bench's "E from timed parts")
    overhead_ms: float = 0.0
    # the prompt's layout (vtprune.engine.state.Layout): image, frame and grid cell of every position, which
    # vtprune.masks.kept_masks reads to draw the stages' kept sets in each image's own patch grid
    layout: Any = field(default=None, repr=False)

    def positions_at(self, layer: int) -> list[torch.Tensor]:
        """Per sample, the original positions that decoder layer ``layer`` sees."""
        return self.positions_by_layer[max(k for k in self.positions_by_layer if k <= layer)]

    @property
    def select_ms(self) -> float:
        return sum(s.select_ms for s in self.stages)

    @property
    def pruned(self) -> bool:
        return self.visual_after != self.visual_before

    def summary(self) -> str:
        if not self.visual_before:
            return "no prefill with visual tokens seen yet"
        parts = [f"visual tokens {self.visual_before} -> {self.visual_after}"]
        parts += [f"{s.stage} {s.method}: {s.before} -> {s.after} ({s.select_ms:.2f} ms)" for s in self.stages]
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"PruneStats({self.summary()})"
