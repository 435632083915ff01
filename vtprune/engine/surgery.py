"""Surgery: cutting the sequence, its masks, positions and KV cache once the selection is made.

* LLM input (prefill): the adapter's :meth:`~vtprune.adapters.base.Adapter.cut_llm_input` gathers the kept
  embeddings, mask, positions and any family-specific inputs; the cache then holds only kept tokens.
* Decode: the mask of each step covers the kept prefix; positions continue from the ORIGINAL length.
* Decoder layer K (prefill): layer K's input is gathered, and the per-layer kwargs the model computed for the
  LLM input (rotary cos/sin, position ids, 4-D masks) are cut for every layer from K on; the cache is ragged
  (layers < K hold more keys), so at decode the masks of layers >= K are re-cut.

Kept tokens keep their ORIGINAL positions unless ``positions="compact"``. Pure functions of the state types.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.adapters.base import Adapter, LayerCut
from vtprune.engine.sequence import compact_positions, take, take_positions
from vtprune.engine.state import Call, Forward, Generation, IndexMap


def base_positions(kwargs: dict, fwd: Forward) -> torch.Tensor:
    """The position ids the model computed for the LLM input, broadcast to (B, L0) or (R, B, L0)."""
    pos = kwargs.get("position_ids")
    B, L0 = fwd.base_mask.shape
    if pos is None or pos.shape[-1] != L0:
        raise RuntimeError("vtprune: decoder layers did not receive the LLM input's position_ids")
    return pos.expand(B, L0) if pos.dim() == 2 else pos


def _memo_key(*objs: Any) -> tuple:
    """A memo key of live objects (the memo entry holds them, so their ids cannot be reused meanwhile)."""
    return tuple(id(o) for o in objs)


def decode_inputs(adapter: Adapter, call: Call, gen: Generation, kwargs: dict, cache: Any,
                  compact: bool) -> dict[str, Any]:
    """The LLM kwargs of a decode step over a cache holding the pruned prompt."""
    new: dict[str, Any] = {}
    embeds = kwargs.get("inputs_embeds")
    q = embeds.shape[1]
    mask = adapter.cut_decode_mask(kwargs, gen.base_mask, gen.orig_len, gen.has_pads, gen.new_tokens, call.kwargs)
    if mask is not None:
        new["attention_mask"] = mask
    pos = kwargs.get("position_ids")
    if pos is None:  # what the unpruned model would use: continue after the ORIGINAL length
        start = gen.orig_len + gen.new_tokens - q
        pos = (torch.arange(q, device=embeds.device) + start).expand(embeds.shape[0], q)
        new["position_ids"] = pos
    elif adapter.derives_decode_positions and not call.gave_positions:
        pos = pos + (gen.orig_len - gen.base_len)  # the VLM counted from the (pruned) cache length
        new["position_ids"] = pos
    if compact and gen.pos_shift is not None:
        shift = gen.pos_shift[:, None] if pos.dim() == 2 else gen.pos_shift[None, :, None]
        new["position_ids"] = pos - shift
    return new


def layer_kwargs(adapter: Adapter, fwd: Forward, l: int, m: IndexMap, kwargs: dict, hidden: torch.Tensor,
                 compact: bool, cache: Any, vlm_kwargs: dict) -> dict[str, Any]:
    """Per-layer kwargs computed by the model for the LLM input, cut to the map ``m`` (memoised for the
    layers of this forward that share them)."""
    objs = (m, kwargs.get("attention_mask"), kwargs.get("position_embeddings"))
    key = (adapter.layer_type(l), *_memo_key(*objs))  # layers of one kind share the model's masks
    if key in fwd.kwargs_memo:
        return fwd.kwargs_memo[key][1]
    index = m.index.clamp(min=0)
    new: dict[str, Any] = {}
    if kwargs.get("position_ids") is not None:
        new["position_ids"] = take_positions(base_positions(kwargs, fwd), index)
    pe = kwargs.get("position_embeddings")
    if compact:
        new["position_ids"], _ = compact_positions(new["position_ids"], fwd.attend(m))
        new["position_embeddings"] = adapter.language_model.rotary_emb(hidden, new["position_ids"])
    elif pe is not None:
        new["position_embeddings"] = tuple(take(t, index) for t in pe)
    cut = LayerCut(kv_index=index, kv_valid=m.valid, q_index=index, mask2d=fwd.attend(m).long(), hidden=hidden,
                   cache=cache, decode=False, orig=fwd.original(m, True), vlm_kwargs=vlm_kwargs)
    mask = adapter.cut_layer_mask(l, kwargs.get("attention_mask"), cut)
    if mask is not None or kwargs.get("attention_mask") is not None:
        new["attention_mask"] = mask
    fwd.kwargs_memo[key] = (objs, new)
    return new


def layer_decode_kwargs(adapter: Adapter, call: Call, l: int, hidden: torch.Tensor,
                        kwargs: dict) -> dict[str, Any]:
    """A decode step's kwargs of decoder layer ``l``, behind an in-LLM step: the mask over this layer's
    (shorter) cache, and compact positions. Memoised per decode step."""
    gen = call.gen
    found = gen.map_at(l)
    if found is None:
        return {}
    first, m = found
    mask = kwargs.get("attention_mask")
    objs = (mask, kwargs.get("position_embeddings"))
    key = (first, adapter.layer_type(l), *_memo_key(*objs))  # call.memo lives for this decode step only
    if key in call.memo:
        return call.memo[key][1]
    new: dict[str, Any] = {}
    B, t = m.index.shape[0], gen.new_tokens  # new tokens so far, incl. this step
    ones = torch.ones(B, t, dtype=torch.long, device=m.valid.device)
    tail = torch.arange(gen.base_len, gen.base_len + t, device=m.index.device).expand(B, t)
    cut = LayerCut(kv_index=torch.cat([m.index.clamp(min=0), tail], dim=1),
                   kv_valid=torch.cat([m.valid, ones.bool()], dim=1), q_index=None,
                   mask2d=torch.cat([(gen.base_mask.gather(1, m.index.clamp(min=0)) * m.valid).long(), ones], dim=1),
                   hidden=hidden, cache=call.cache, decode=True, vlm_kwargs=call.kwargs)
    cut_mask = adapter.cut_layer_mask(l, mask, cut)
    if cut_mask is not None or mask is not None:
        new["attention_mask"] = cut_mask
    shift = sum(s for k, s in gen.layer_shift.items() if k <= l) if gen.layer_shift else None
    if shift is not None and kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"]
        pos = pos - (shift[:, None] if pos.dim() == 2 else shift[None, :, None])
        new["position_ids"] = pos
        new["position_embeddings"] = adapter.language_model.rotary_emb(hidden, pos)
    call.memo[key] = (objs, new)
    return new


def compact_layer_shift(fwd: Forward, gen: Generation, l: int, cur: IndexMap, kwargs: dict) -> None:
    """``positions="compact"``: the extra position shift of decode steps at layers >= ``l`` after a step at l."""
    _, shift = compact_positions(take_positions(base_positions(kwargs, fwd), cur.index.clamp(min=0)), fwd.attend(cur))
    gen.layer_shift[l] = shift - gen.shift_before(l)
