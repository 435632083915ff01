"""The engine's state, as explicit types.

Coordinates: the ORIGINAL sequence is the prompt as the caller gave it (B, L); the BASE sequence is the LLM
input after the pre-LLM steps (B, L0); the sequence entering decoder layer l may be shorter again (in-LLM
steps). An :class:`IndexMap` maps a sequence's slots back one level; rows of different lengths are
left-padded with invalid slots.

Lifetimes: a :class:`Forward` is one prefill (its captures and maps), a :class:`Call` one forward of the VLM
(``model.model``), a :class:`Generation` what decode steps need from the prefill that filled one KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vtprune.adapters.base import VisionRecord
from vtprune.budget import Budget
from vtprune.methods.base import Method
from vtprune.types import PruneStats


@dataclass
class Step:
    """One method at one stage with its resolved budget."""

    method: Method
    budget: Budget
    label: str  # "vision" | "input" | "layer:K"
    layer: int | None  # K for layer steps
    newlines: str = "row"  # structural tokens (AnyRes newlines): "row" survive with their row, "all" always


@dataclass
class IndexMap:
    """Current sequence -> base (LLM input) sequence: ``index[b, j]`` is the base position of slot j,
    ``valid[b, j]`` is False for padding slots we added (which point at a dropped token and are masked)."""

    index: torch.Tensor  # (B, L_cur) long
    valid: torch.Tensor  # (B, L_cur) bool
    version: int = 0

    def then(self, order: torch.Tensor, valid: torch.Tensor) -> IndexMap:
        """This map after keeping slots ``order`` (B, L') of it, ``valid`` (B, L') marking real ones."""
        return IndexMap(torch.where(valid, self.index.gather(1, order), -1), valid, self.version + 1)


@dataclass
class Layout:
    """Per-position facts about the ORIGINAL sequence of one prefill, all (B, L)."""

    visual: torch.Tensor  # bool: a visual token (placeholder), structural ones included
    cand: torch.Tensor  # bool: a visual token a method may select (not structural)
    image: torch.Tensor  # long: global image index (-1 text)
    frame: torch.Tensor  # long: frame within the image
    src: torch.Tensor  # long: row of the flattened ViT token array (-1 none)
    grid: torch.Tensor  # (B, L, 3) long
    line: torch.Tensor  # long: canvas-row id for the newline rule (-1 none)
    vtok: torch.Tensor  # long: index of the visual token in layout order (records, images, tokens); -1 text


@dataclass
class Forward:
    """State of one prefill: the original sequence, captured signals and the current index maps."""

    layout: Layout
    records: list[VisionRecord]  # in layout order; ``layout.src`` indexes their concatenated ViT rows
    embeds: torch.Tensor  # (B, L, D) LLM input embeddings, original coordinates (overrides written here)
    projected: torch.Tensor  # (B, L, D) the same, never overridden
    mask0: torch.Tensor  # (B, L) long 2-D attention mask of the original sequence
    input_ids: torch.Tensor | None  # (B, L) the prompt's token ids, if the model got them
    base: IndexMap  # LLM input -> original
    base_mask: torch.Tensor | None = None  # (B, L0) long mask of the LLM input
    layer_maps: dict[int, IndexMap] = field(default_factory=dict)  # first layer -> map into base
    captures: dict[tuple[str, int], dict[Any, Any]] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # signals computed once per forward
    kwargs_memo: dict[Any, Any] = field(default_factory=dict)  # per-layer kwargs cuts shared by layers

    def map_at(self, layer: int) -> IndexMap | None:
        """The map of the hidden states entering ``layer`` (None: the base sequence)."""
        keys = [k for k in self.layer_maps if k <= layer]
        return self.layer_maps[max(keys)] if keys else None

    def base_identity(self) -> IndexMap:
        """The map of the base sequence onto itself."""
        B, L0 = self.base_mask.shape
        return IndexMap(torch.arange(L0, device=self.base_mask.device).expand(B, L0), self.base.valid)

    def attend(self, m: IndexMap) -> torch.Tensor:
        """(B, L') bool: slots of ``m`` that are real tokens (not the caller's padding, not ours)."""
        return self.base_mask.gather(1, m.index.clamp(min=0)).bool() & m.valid

    def original(self, m: IndexMap | None, layer_step: bool) -> torch.Tensor:
        """(B, L') original positions of the slots of ``m`` (a layer map points into the base sequence)."""
        m = m or self.base
        orig = m.index.clamp(min=0)
        return self.base.index.clamp(min=0).gather(1, orig) if layer_step else orig


@dataclass
class Generation:
    """What decode steps need from the prefill that pruned; paired with that prefill's KV cache object."""

    orig_len: int  # L: prompt length as the caller sees it
    base_len: int  # L0: length of the LLM input after pre-LLM pruning
    base_mask: torch.Tensor  # (B, L0)
    base_pruned: bool
    has_pads: bool
    pos_shift: torch.Tensor | None  # (B,) compact-position shift at the LLM input
    layer_maps: dict[int, IndexMap]
    layer_shift: dict[int, torch.Tensor]  # first layer -> (B,) extra compact shift for layers >= it
    new_tokens: int = 0  # tokens decoded since the prompt, this step's included (counted, not read off the cache:
    # a hybrid model's cache reports the length of whichever layer it picks, pruned or not)

    def map_at(self, layer: int) -> tuple[int, IndexMap] | None:
        keys = [k for k in self.layer_maps if k <= layer]
        return (max(keys), self.layer_maps[max(keys)]) if keys else None

    def shift_before(self, layer: int) -> torch.Tensor | int:
        """The compact-position shift of the steps acting below ``layer``."""
        earlier = [k for k in self.layer_shift if k < layer]
        return sum(self.layer_shift[k] for k in earlier) if earlier else 0


@dataclass
class Call:
    """One forward of the VLM (``model.model``): what it was given and the state of its LLM pass. Every
    hook reads the innermost active call, so state never leaks from one forward into another."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    gave_positions: bool  # the caller passed position_ids or a mask (Qwen then derives no rope_deltas)
    kwargs: dict[str, Any]  # everything the VLM's forward was given (family inputs such as token_type_ids)
    encoded: dict[str, Any]  # modality -> the pre-encoded features (``mm_encoder_outputs``) it was given
    produced: dict[str, VisionRecord] = field(default_factory=dict)  # feature calls made during this forward
    phase: str | None = None  # "prefill" | "decode" while the LLM runs; None: pass through
    fwd: Forward | None = None
    gen: Generation | None = None
    cache: Any = None  # the KV cache of a decode step
    stats: PruneStats | None = None
    last_layer: int = -1
    memo: dict[Any, Any] = field(default_factory=dict)  # this decode step's cuts, shared by decoder layers


@dataclass
class LossCall:
    """A top-level forward given ``labels``: the loss is computed after pruning, on the kept tokens."""

    labels: torch.Tensor  # (B, L) in the caller's (original) coordinates
    extra: dict[str, Any]  # loss kwargs (num_items_in_batch, ignore_index)
    kept: list[torch.Tensor] | None = None  # per row, original positions that reach the LM head (None: all)
