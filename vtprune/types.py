"""Small shared types: stages, signal names and the statistics a handle reports.

Shape symbols used across vtprune: B batch rows, L sequence length, S spans in one selection call,
N candidate tokens per span, K kept tokens per span, D hidden width, H heads, Dv vision width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Where a method acts. ``vision`` and ``input`` both drop tokens where the LLM input sequence is formed
#: (transformers checks that every placeholder gets a feature, so tokens cannot vanish earlier); they
#: differ in the signals they read: ``vision`` methods score from the vision tower, ``input`` methods
#: from the projected tokens. ``layer`` methods drop at the input of decoder layer K during prefill.
STAGES: tuple[str, ...] = ("vision", "input", "layer")

#: Every signal an adapter may supply to a method (see :class:`vtprune.signals.Signals`).
SIGNALS: tuple[str, ...] = (
    "tokens",  # the sequence representation where the method acts: LLM input embeddings or layer-K input
    "projected",  # projector output (the LLM input embedding) of each candidate
    "vit_features",  # pre-projector vision features of each candidate (the projector's input)
    "vit_keys",  # keys of the CLS-attention ViT layer at each candidate's patch
    "cls_attention",  # [CLS] -> patch attention of a chosen ViT layer, head mean
    "received_attention",  # attention a patch receives in a ViT layer (query and head mean)
    "instruction",  # embeddings of the text tokens that follow the visual tokens
    "text_attention",  # attention of text queries to each candidate at decoder layer K-1 (layer stage)
    "hidden_prev",  # input of decoder layer K-1 at each candidate (layer stage)
    "prev_queries",  # post-RoPE queries of decoder layer K-1 at each candidate (layer stage)
    "prev_keys",  # post-RoPE keys of decoder layer K-1 (candidates, or the text after the span)
    "text_tokens",  # the stage's representation of the text after each span
    "final_norm",  # the LLM's final norm as a callable
    "instruction_ids",  # token ids of the text after the visual tokens
    "vit_cls",  # [CLS] hidden state of a ViT layer (of each candidate's tile)
    "padding_fraction",  # share of a patch that is pad-to-square fill
    "embed_tokens",  # the LLM's input embedding table
    "transition",  # TransPrune's token transition variation over accumulation layers
    "projector",  # the projector as a callable
    "grid",  # (group, row, col) of each candidate in its image / frame grid
    "prompt_positions",  # index of each candidate in its unpadded prompt
)


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
