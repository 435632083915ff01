"""The Hugging Face host: hooks a transformers VLM through the Patcher and runs the selection core at the right
moments.

Hooks (all undone by ``handle.remove()``): the feature calls (``get_image_features`` / ``get_video_features``,
wrapped: they produce each image's layout and vision signals), a pre/post hook pair on the VLM (one
:class:`~vtprune.engine.state.Call` per forward), a pre-hook on the language model (prune the LLM input in
prefill, fix masks and positions at decode), pre-hooks on decoder layers from the first in-LLM step on, the
capture hooks of :mod:`vtprune.engine.capture`, and on the top-level model ``labels`` and ``generate``.

State is paired with what it belongs to, never with "the last call": a feature call's record with the output
object it returned, a forward's state with its Call (a stack: the innermost forward), decode state with the
KV cache object its prefill filled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from vtprune import compat
from vtprune.adapters.base import Adapter, VisionRecord
from vtprune.engine import loss, surgery
from vtprune.engine.capture import Captures
from vtprune.engine.layout import build_layout, placed, pooled
from vtprune.engine.selection import Selected
from vtprune.engine.sequence import compact_positions, kept_order
from vtprune.engine.state import Call, Forward, Generation, IndexMap, LossCall, Step
from vtprune.engine.steps import run_pre_llm, run_step
from vtprune.kernels import gather_sequence
from vtprune.types import PruneStats


class Engine:
    """Installs the hooks for one ``prune()`` call and runs its steps. One per handle."""

    def __init__(self, adapter: Adapter, steps: list[Step], positions: str, stats_box: list[PruneStats]) -> None:
        self.adapter = adapter
        self.steps = steps
        self.pre_steps = [s for s in steps if s.layer is None]
        self.layer_steps: dict[int, list[Step]] = {}
        for s in steps:
            if s.layer is not None:
                self.layer_steps.setdefault(s.layer, []).append(s)
        self.compact = positions == "compact"
        self._stats_box = stats_box  # the handle reads stats_box[0]
        self._pending: VisionRecord | None = None  # the feature call running now (ViT captures fill it)
        self._encoded: WeakIdKeyDictionary = WeakIdKeyDictionary()  # feature output -> its VisionRecord
        self._generations: WeakIdKeyDictionary = WeakIdKeyDictionary()  # KV cache -> Generation
        self._calls: list[Call] = []  # active VLM forwards, innermost last
        self._losses: list[LossCall | None] = []  # active top-level forwards
        self.captures = Captures(adapter, lambda: self._pending, self._prefilling)

    # ================================================================== installation
    def install(self, patcher: Any) -> None:
        a = self.adapter
        vlm, lm = a.vlm, a.language_model
        for modality, (fn_name, _) in a.modalities.items():
            patcher.wrap_method(vlm, fn_name, self._wrap_features(modality))
        if hasattr(a.model, "generate"):
            patcher.wrap_method(a.model, "generate", _refuse_chunked_prefill, what="vtprune: refuse chunked prefill")
        if a.model is not vlm:  # labels= is taken by the top-level model: cut them with the tokens
            patcher.pre_hook(a.model, self._on_model, what="vtprune: hold labels until the tokens are cut")
            patcher.post_hook(a.model, self._after_model, what="vtprune: loss on the kept tokens", always_call=True)
        patcher.pre_hook(vlm, self._on_vlm, what="vtprune: open a forward")
        patcher.post_hook(vlm, self._after_vlm, what="vtprune: close a forward", always_call=True)
        patcher.pre_hook(lm, self._on_lm, what="vtprune: prune the LLM input")
        patcher.post_hook(lm, self._after_lm, what="vtprune: finish prefill")
        if self.layer_steps:  # before the captures: a capture at layer K-1 sees what an earlier step kept
            for l in range(min(self.layer_steps), a.num_layers):
                patcher.pre_hook(a.decoder_layers[l], self._layer_hook(l), what=f"vtprune: decoder layer {l}")
        self.captures.install(patcher, self.steps)
        a.install_extra(self, patcher)

    # ================================================================== forwards
    @property
    def call(self) -> Call | None:
        """The innermost VLM forward running now (None outside one)."""
        return self._calls[-1] if self._calls else None

    def _prefilling(self) -> Call | None:
        call = self.call
        return call if call is not None and call.phase == "prefill" and call.fwd is not None else None

    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ctx, new = loss.hold_labels(kwargs)
        self._losses.append(ctx)
        return None if ctx is None else (args, new)

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ctx = self._losses.pop() if self._losses else None
        return None if ctx is None or output is None else loss.with_loss(module, output, ctx)

    def _on_vlm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        self._calls.append(Call(
            input_ids=kwargs.get("input_ids", args[0] if args else None), inputs_embeds=kwargs.get("inputs_embeds"),
            gave_positions=kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None,
            kwargs=kwargs, encoded={m: out for m, out in encoded.items() if out is not None}))

    def _after_vlm(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._calls:
            self._calls.pop()

    def _wrap_features(self, modality: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            def get_features(*args: Any, **kwargs: Any) -> Any:
                if self._pending is not None:  # nested (Qwen3-VL's video path calls the image one)
                    return original(*args, **kwargs)
                record = VisionRecord(modality=modality)
                if self.captures.needs_pixels:  # a reference, for signals computed from the input image
                    record.stash["pixels"] = kwargs.get(f"pixel_values{'_videos' if modality == 'video' else ''}",
                                                        args[0] if args else None)
                self._pending = record
                try:
                    out = original(*args, **kwargs)
                finally:
                    self._pending = None
                t0 = time.perf_counter()
                self.adapter.image_layouts(modality, args, kwargs, out, record)
                record.produced = list(record.images)
                feats = pooled(out)
                record.meta["pooled"] = list(feats) if isinstance(feats, (list, tuple)) else feats
                try:
                    self._encoded[out] = record  # a later forward given these features finds their record
                except TypeError:  # not weak-referenceable (a plain tuple from return_dict=False)
                    pass
                if self.call is not None:  # made inside a forward (pixels passed to it): the features it places
                    self.call.produced[modality] = record
                record.meta["overhead_ms"] = (time.perf_counter() - t0) * 1e3
                return out

            return get_features

        return wrap

    # ================================================================== the LLM input
    def _on_lm(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.call
        if call is None:  # the language model called on its own: no images to prune
            return None
        cache = compat.cache_in(kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise NotImplementedError(
                "vtprune drops tokens, which a static (compileable) KV cache cannot hold; use the default DynamicCache")
        if cache is None or cache.get_seq_length() == 0:
            return self._prefill(call, args, kwargs)
        return self._decode(call, kwargs, cache)

    def _prefill(self, call: Call, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        t0 = time.perf_counter()
        out = self._prefill_cut(call, args, kwargs)
        if call.stats is not None and call.phase == "prefill":
            records = call.fwd.records if call.fwd is not None else []
            call.stats.overhead_ms += (time.perf_counter() - t0) * 1e3 + sum(
                r.meta.get("overhead_ms", 0.0) for r in records)
        return out

    def _prefill_cut(self, call: Call, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        masks = self.adapter.visual_masks(call.input_ids, call.inputs_embeds) if embeds is not None else {}
        if not masks or any(m.shape != embeds.shape[:2] for m in masks.values()) or not any(
                bool(m.any()) for m in masks.values()):
            self._stats_box[0] = PruneStats()  # a prompt with no image passes through untouched
            return None
        B, L, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and not self.adapter.takes_mask(mask):
            raise NotImplementedError(f"vtprune needs a 2-D attention_mask (or None); got {type(mask).__name__} "
                                      f"{tuple(getattr(mask, 'shape', ()))}")
        grad = torch.is_grad_enabled() and embeds.requires_grad  # the selection needs none; the gathers keep it
        with torch.no_grad():
            mask0 = self.adapter.padding_mask(mask, embeds, call.kwargs)
            records = {m: placed(self._encoded.get(call.encoded[m]) if m in call.encoded else call.produced.get(m),
                                 call.encoded.get(m), masks[m]) for m in masks}
            ids = call.input_ids if call.input_ids is not None and call.input_ids.shape == (B, L) else None
            layout, used = build_layout(self.adapter, masks, records, ids)
            ident = torch.arange(L, device=embeds.device).expand(B, L)
            fwd = Forward(layout=layout, records=used, embeds=embeds, projected=embeds, mask0=mask0, input_ids=ids,
                          base=IndexMap(ident, torch.ones(B, L, dtype=torch.bool, device=embeds.device)))
            call.fwd, call.phase, call.last_layer = fwd, "prefill", -1
            call.stats = PruneStats(visual_before=layout.visual.sum(1).tolist(), layout=layout)
            cur = run_pre_llm(self.adapter, self.pre_steps, fwd, call.stats, grad=grad)
            fwd.base = cur
            index = cur.index.clamp(min=0)  # (B, L0)
            fwd.base_mask = mask0.gather(1, index) * cur.valid
        new: dict[str, Any] = {}
        pos_shift = None
        if cur.version > 0:
            new = self.adapter.cut_llm_input(fwd.embeds, kwargs, index, cur.valid, mask0, call.kwargs)
            if self.compact:
                new["position_ids"], pos_shift = compact_positions(new["position_ids"], fwd.base_mask.bool())
        call.gen = Generation(orig_len=L, base_len=index.shape[1], base_mask=fwd.base_mask, base_pruned=cur.version > 0,
                              has_pads=bool((~cur.valid).any()), pos_shift=pos_shift, layer_maps=fwd.layer_maps,
                              layer_shift={})
        cache = compat.cache_in(kwargs)
        if cache is not None:  # an empty cache given to the prefill: its decode steps are ours
            self._generations[cache] = call.gen
        return (args, {**kwargs, **new}) if new else None

    def _decode(self, call: Call, kwargs: dict, cache: Any) -> tuple[tuple, dict] | None:
        gen = self._generations.get(cache)
        if gen is None:  # not a sequence we pruned: leave it alone
            return None
        q = kwargs["inputs_embeds"].shape[1]
        visual = self.adapter.visual_masks(call.input_ids, call.inputs_embeds) if q > 1 else {}
        if any(bool(m.any()) for m in visual.values()):
            raise NotImplementedError(
                "vtprune prunes a prompt's images in one prefill, but this forward brings visual tokens to a KV cache "
                "that already holds a pruned prompt (chunked prefill, or an image in a later turn); run the prompt "
                "in one prefill (no prefill_chunk_size), or start a new cache")
        call.phase, call.gen, call.cache, call.memo = "decode", gen, cache, {}
        gen.new_tokens += q
        if not gen.base_pruned:
            return None
        return (), {**kwargs, **surgery.decode_inputs(self.adapter, call, gen, kwargs, cache, self.compact)}

    def _after_lm(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self._prefilling()
        if call is None:
            return
        cache = compat.cache_out(output)
        if cache is not None and call.gen is not None:
            self._generations[cache] = call.gen
        self._finish_stats(call)
        call.fwd, call.phase = None, None  # release captured activations

    # ================================================================== decoder layers
    def current_layer_map(self) -> IndexMap | None:
        """In prefill, the map of the decoder layer that ran last (None: the LLM input sequence)."""
        call = self._prefilling()
        return None if call is None else call.fwd.map_at(call.last_layer)

    def _layer_hook(self, l: int) -> Callable[..., tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            call = self.call
            if call is None:
                return None
            call.last_layer = l
            hidden = args[0] if args else kwargs["hidden_states"]
            if call.phase == "prefill" and call.fwd is not None:
                t0 = time.perf_counter()
                hidden, new = self._layer_prefill(call, l, hidden, kwargs)
                call.stats.overhead_ms += (time.perf_counter() - t0) * 1e3
            elif call.phase == "decode" and call.gen is not None:
                new = surgery.layer_decode_kwargs(self.adapter, call, l, hidden, kwargs) or None
            else:
                return None
            if new is None:  # nothing cut at this layer (its input is what the previous layer gave)
                return None
            if args:
                return (hidden, *args[1:]), {**kwargs, **new}
            return args, {**kwargs, **new, "hidden_states": hidden}

        return hook

    def _layer_prefill(self, call: Call, l: int, hidden: torch.Tensor,
                       kwargs: dict) -> tuple[torch.Tensor, dict | None]:
        fwd = call.fwd
        if l in self.layer_steps:
            grad = torch.is_grad_enabled() and hidden.requires_grad
            prev = fwd.map_at(l - 1) or fwd.base_identity()
            cur = prev
            # slot of each current token in the coordinates of the hidden states entering layer l (where layer
            # l-1's signals were captured); changes if several steps act at layer l
            local = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
            for step in self.layer_steps[l]:
                chosen = self._run(step, fwd, cur, hidden, call.stats, local=local, prev=prev, layer_kwargs=kwargs,
                                   grad=grad)
                if not chosen.changed:
                    continue
                if chosen.merged is not None:  # merged representations, written before the gather
                    rows, slots, vals = chosen.merged
                    hidden = hidden.clone()
                    hidden[rows, slots] = vals.to(hidden.dtype)
                order, valid = kept_order(chosen.keep)
                hidden = gather_sequence(hidden, order, valid).hidden  # (B, L', D)
                local = local.gather(1, order)
                cur = cur.then(order, valid)
            if cur is not prev:
                fwd.layer_maps[l] = cur
                if self.compact:
                    surgery.compact_layer_shift(fwd, call.gen, l, cur, kwargs)
        m = fwd.map_at(l)
        if m is None:
            return hidden, None
        cache = compat.cache_in(kwargs)
        return hidden, surgery.layer_kwargs(self.adapter, fwd, l, m, kwargs, hidden, self.compact, cache, call.kwargs)

    # ================================================================== selection
    def _run(self, step: Step, fwd: Forward, cur: IndexMap, tokens: torch.Tensor | None, stats: PruneStats, *,
             local: torch.Tensor | None = None, prev: IndexMap | None = None, layer_kwargs: dict | None = None,
             grad: bool = False) -> Selected:
        return run_step(self.adapter, step, fwd, cur, tokens, stats, local=local, prev=prev,
                        layer_kwargs=layer_kwargs, grad=grad)

    def _finish_stats(self, call: Call) -> None:
        fwd = call.fwd
        stats = call.stats or PruneStats()
        vis = fwd.layout.visual
        base_idx, base_valid = fwd.base.index.clamp(min=0), fwd.base.valid
        maps = {0: (base_idx, base_valid)}
        for K, m in sorted(fwd.layer_maps.items()):
            maps[K] = (base_idx.gather(1, m.index.clamp(min=0)), m.valid)
        stats.positions_by_layer = {K: [idx[b][valid[b]] for b in range(idx.shape[0])]
                                    for K, (idx, valid) in maps.items()}
        counts = {K: (vis.gather(1, idx) & valid).sum(1) for K, (idx, valid) in maps.items()}
        per_layer = torch.stack([counts[max(k for k in counts if k <= l)] for l in range(self.adapter.num_layers)])
        last = max(maps)
        stats.visual_after = counts[last].tolist()
        stats.kept_positions = stats.positions_by_layer[last]
        stats.mean_visual_per_layer = per_layer.float().mean(0).tolist()
        self._stats_box[0] = stats
        ctx = self._losses[-1] if self._losses else None
        if ctx is not None and (fwd.base.version > 0 or fwd.layer_maps):  # the logits rows are these tokens
            ctx.kept = stats.kept_positions


def _refuse_chunked_prefill(original: Callable[..., Any]) -> Callable[..., Any]:
    def generate(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("generation_config") or getattr(original.__self__, "generation_config", None)
        chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if chunk:  # later chunks would bring visual tokens to a cache holding a pruned prefix
            raise NotImplementedError(f"vtprune prunes a prompt in one prefill; chunked prefill "
                                      f"(prefill_chunk_size={chunk}) is not supported")
        return original(*args, **kwargs)

    return generate
