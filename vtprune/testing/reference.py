"""Independent references for the DESIGN invariants: the UNPATCHED model on the full sequence, where each
decoder layer may only attend to the tokens kept at that layer (a 4-D additive mask), with the original
position ids and no KV cache. Pruning must reproduce it (up to float rounding) at every kept position.

This shares no code with the engine: it never gathers, never touches position ids or caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vtprune.types import PruneStats


def kept_mask(stats: PruneStats, layer: int, length: int) -> torch.Tensor:
    """(B, length) bool: original positions present at ``layer``; positions past the prompt (generated
    tokens) are always present."""
    per_row = stats.positions_at(layer)
    prompt = max(int(p.max()) for p in per_row if p.numel()) + 1 if per_row else 0
    out = torch.zeros(len(per_row), length, dtype=torch.bool)
    for b, pos in enumerate(per_row):
        out[b, pos] = True
    out[:, prompt:] = True
    return out


def generate_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate()`` gives a (left-)padded prompt: cumsum of the mask - 1."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def masked_forward(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    stats: PruneStats,
    position_ids: torch.Tensor | None = None,
    compact: bool = False,
    differentiable: bool = False,
) -> torch.Tensor:
    """Logits (B, L, V) of the unpatched ``model`` on ``inputs`` with each layer masked to the kept tokens.

    ``compact=True`` re-indexes positions over the tokens kept at the LLM input (``positions="compact"``
    for input-stage pruning). ``differentiable=True`` keeps the autograd graph (the gradient reference).
    """
    with torch.set_grad_enabled(differentiable):
        return _masked_forward(model, inputs, stats, position_ids, compact)


def _masked_forward(model: torch.nn.Module, inputs: dict[str, Any], stats: PruneStats,
                    position_ids: torch.Tensor | None, compact: bool) -> torch.Tensor:
    lm = model.model.language_model
    layers: Sequence[torch.nn.Module] = lm.layers
    B, L = inputs["input_ids"].shape if "input_ids" in inputs else inputs["inputs_embeds"].shape[:2]
    am = inputs.get("attention_mask")
    am = torch.ones(B, L, dtype=torch.bool) if am is None else am.bool()
    dtype = model.dtype
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    masks = []
    for l in range(len(layers)):
        allowed = causal[None] & am[:, None, :] & kept_mask(stats, l, L)[:, None, :]  # (B, L, L)
        add = torch.zeros(B, 1, L, L, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
        masks.append(add)
    if compact:
        keep0 = kept_mask(stats, 0, L) & am
        base = position_ids if position_ids is not None else torch.arange(L).expand(B, L)
        first = torch.where(keep0, base, L * 10).min(1).values
        position_ids = torch.where(keep0, first[:, None] + keep0.long().cumsum(1) - 1, 0)
    handles = []
    for l, layer in enumerate(layers):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, mask: torch.Tensor = masks[l]) -> tuple:
            return args, {**kwargs, "attention_mask": mask}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        kw = {k: v for k, v in inputs.items()}
        if position_ids is not None:
            kw["position_ids"] = position_ids
        return model(**kw, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def pruned_rows(logits: torch.Tensor, stats: PruneStats) -> list[torch.Tensor]:
    """Per sample, the pruned model's logits rows of its kept tokens (drops left-padding slots)."""
    return [logits[b, logits.shape[1] - p.numel() :] for b, p in enumerate(stats.kept_positions)]
