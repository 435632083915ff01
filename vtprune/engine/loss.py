"""``labels=`` through a pruned forward: the model's own causal-LM loss on the tokens that reach its head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vtprune.engine.state import LossCall


def hold_labels(kwargs: dict) -> tuple[LossCall | None, dict]:
    """A top-level forward's labels, taken out of its kwargs until the tokens are cut (None: no labels)."""
    labels = kwargs.get("labels")
    if labels is None:
        return None, kwargs
    extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
    return LossCall(labels=labels, extra=extra), {k: v for k, v in kwargs.items() if k != "labels"}


def with_loss(module: nn.Module, output: Any, ctx: LossCall) -> Any:
    """``output`` with the loss put first, as the model itself would have returned it."""
    logits = output["logits"] if isinstance(output, dict) else output[0]
    loss = causal_lm_loss(module, logits, ctx)
    if isinstance(output, dict):
        return type(output)(**{"loss": loss, **{k: v for k, v in output.items() if k != "loss"}})
    return (loss, *output)


def causal_lm_loss(module: nn.Module, logits: torch.Tensor, ctx: LossCall) -> torch.Tensor:
    """The model's own loss function. Pruned: each kept row predicts the label that followed its token in the
    ORIGINAL sequence, rows of dropped tokens (no logits) predict nothing; equal to the loss of the masked
    reference with the dropped rows' targets ignored (in SFT data, image rows are ignored anyway)."""
    labels = ctx.labels
    vocab = logits.shape[-1]
    if ctx.kept is None:
        return module.loss_function(logits=logits, labels=labels, vocab_size=vocab, **ctx.extra)
    ignore = ctx.extra.get("ignore_index", -100)
    shifted = F.pad(labels, (0, 1), value=ignore)[:, 1:]  # (B, L): next-token target of each position
    B, R = logits.shape[:2]
    target = torch.full((B, R), ignore, dtype=labels.dtype, device=labels.device)  # (B, R)
    for b, pos in enumerate(ctx.kept):  # kept tokens fill the last slots of their row, in order
        m = min(pos.numel(), R)
        if m:
            target[b, R - m:] = shifted[b, pos[pos.numel() - m:].to(labels.device)]
    return module.loss_function(logits=logits, labels=None, shift_labels=target, vocab_size=vocab, **ctx.extra)
