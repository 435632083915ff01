"""Independent references for the DESIGN invariants: the UNPATCHED model on the full sequence, where each
decoder layer may only attend to the tokens kept at that layer (the model's own mask for the layer -- causal,
padding, bidirectional image blocks -- with the dropped keys masked out), with the original position ids and
no KV cache. A recurrent (linear-attention) layer cannot mask a token out, so it runs on each row's present
tokens alone. Pruning must reproduce it (up to float rounding) at every kept position.

This shares no code with the engine: it never cuts the sequence, never touches position ids or caches.
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
    """Logits (B, L, V) of the unpatched ``model`` on ``inputs`` with each layer masked to the kept tokens, and the
    merged representations of merging methods written where and when they act (the LLM input, or layer K's input).

    ``compact=True`` re-indexes positions over the tokens kept at the LLM input (``positions="compact"``
    for input-stage pruning). ``differentiable=True`` keeps the autograd graph (the gradient reference).
    """
    with torch.set_grad_enabled(differentiable):
        return _masked_forward(model, inputs, stats, position_ids, compact)


def _masked_forward(model: torch.nn.Module, inputs: dict[str, Any], stats: PruneStats,
                    position_ids: torch.Tensor | None, compact: bool) -> torch.Tensor:
    inner = model.model
    lm = inner.language_model if hasattr(inner, "language_model") else inner.text_model  # SmolVLM / Idefics3
    layers: Sequence[torch.nn.Module] = lm.layers
    B, L = inputs["input_ids"].shape if "input_ids" in inputs else inputs["inputs_embeds"].shape[:2]
    am = inputs.get("attention_mask")
    am = torch.ones(B, L, dtype=torch.bool) if am is None else am.bool()
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    present = [kept_mask(stats, l, L) for l in range(len(layers))]  # (B, L) tokens present at each layer
    if compact:
        keep0 = present[0] & am
        base = position_ids if position_ids is not None else torch.arange(L).expand(B, L)
        first = torch.where(keep0, base, L * 10).min(1).values
        position_ids = torch.where(keep0, first[:, None] + keep0.long().cumsum(1) - 1, 0)
    handles = []
    for l, writes in _merged_writes(stats).items():  # merging methods: their values at the layer they act
        # the LLM input is written where the language model takes it: a family may read its input embeddings
        # beyond the residual stream (Gemma-4's per-layer inputs)
        target, key = (lm, "inputs_embeds") if l == 0 else (layers[l], "hidden_states")
        handles.append(target.register_forward_pre_hook(_writing(writes, key), with_kwargs=True))
    for l, layer in enumerate(layers):
        mixer = getattr(layer, "linear_attn", None)
        if mixer is not None:  # a recurrent layer cannot mask a token out: run it on the present tokens only
            handles.append(mixer.register_forward_hook(_removing(present[l] & am), with_kwargs=True))
        else:  # the model's own mask for this layer (causal, padding, image blocks, windows), kept keys only
            handles.append(layer.register_forward_pre_hook(_masking(present[l], causal & am[:, None, :]),
                                                           with_kwargs=True))
    try:
        kw = {k: v for k, v in inputs.items()}
        if position_ids is not None:
            kw["position_ids"] = position_ids
        return model(**kw, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def _merged_writes(stats: PruneStats) -> dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Decoder layer -> (row, original positions, values) a merging stage wrote into that layer's input (0: the LLM
    input), in stage order."""
    out: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for st in stats.stages:
        layer = int(st.stage.split(":")[1]) if st.stage.startswith("layer:") else 0
        for b, (pos, val) in enumerate(zip(st.merged_positions, st.merged_values)):
            if pos.numel():
                out.setdefault(layer, []).append((b, pos, val))
    return out


def _writing(writes: list[tuple[int, torch.Tensor, torch.Tensor]], key: str = "hidden_states") -> Any:
    """A pre-hook writing merged representations into a module's input ``key`` (a decoder layer's hidden states, the
    language model's input embeddings) at original positions."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        hidden = (kwargs[key] if key in kwargs else args[0]).clone()
        for b, pos, val in writes:
            hidden[b, pos.to(hidden.device)] = val.to(hidden.device, hidden.dtype)
        if key not in kwargs:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, key: hidden}

    return hook


def _masking(present: torch.Tensor, fallback: torch.Tensor) -> Any:
    """A layer pre-hook ANDing the layer's mask with the present keys (``fallback`` (B, L, L) where sdpa's
    mask is None: causal within the padding)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        mask = kwargs.get("attention_mask")
        dtype = (args[0] if args else kwargs["hidden_states"]).dtype
        if mask is None:
            allowed = fallback & present[:, None, :]
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        elif mask.dtype == torch.bool:
            mask = mask & present[:, None, None, :]
        else:
            mask = mask.masked_fill(~present[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    return hook


def _removing(present: torch.Tensor) -> Any:
    """A forward hook recomputing a token mixer's output on each row's present tokens alone."""
    busy = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if busy:  # the recomputation below calls the module again
            return None
        x = args[0] if args else kwargs["hidden_states"]
        out = (output[0] if isinstance(output, tuple) else output).clone()
        busy.append(True)
        try:
            for b in range(x.shape[0]):
                idx = present[b].nonzero()[:, 0]
                out[b, idx] = module(x[b : b + 1, idx])[0]
        finally:
            busy.pop()
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def pruned_rows(logits: torch.Tensor, stats: PruneStats) -> list[torch.Tensor]:
    """Per sample, the pruned model's logits rows of its kept tokens (drops left-padding slots)."""
    return [logits[b, logits.shape[1] - p.numel() :] for b, p in enumerate(stats.kept_positions)]
