"""Signals of one pruning step, computed lazily in that step's coordinates (the
:class:`~vtprune.signals.SignalSource` behind every :class:`~vtprune.signals.Signals` the engine builds).

Sequence signals are gathered from the LLM input or the current hidden states; decoder-attention signals
are recomputed from the q/k projections of the layer that needs them (only the query rows asked for);
vision-tower signals are computed once per forward from what the ViT hooks captured and mapped onto the
LLM tokens by the adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from vtprune.adapters.base import Adapter, VisionRecord
from vtprune.engine.sequence import take
from vtprune.engine.state import Forward, IndexMap, Step
from vtprune.kernels import attention_rows
from vtprune.signals import Signals


class StageView:
    """The :class:`~vtprune.signals.SignalSource` of one step: computes signals in its coordinates."""

    def __init__(self, adapter: Adapter, fwd: Forward, step: Step, orig: torch.Tensor, tokens: torch.Tensor | None,
                 local: torch.Tensor | None, prev: IndexMap | None, cur: IndexMap,
                 layer_kwargs: dict | None) -> None:
        self.adapter, self.fwd, self.step, self.orig, self.tokens = adapter, fwd, step, orig, tokens
        self.local, self.prev = local, prev  # layer steps: current slot -> captured slot; captured coords map
        self.cur, self.layer_kwargs = cur, layer_kwargs  # the current map; layer K's kwargs (base coordinates)

    def _captured(self, sig: Signals) -> torch.Tensor:
        """(S, N) slots of the candidates in the coordinates where layer K-1 was captured."""
        return self.local[sig.rows[:, None], sig.positions]

    def _orig_of(self, sig: Signals) -> torch.Tensor:
        return self.orig[sig.rows[:, None], sig.positions]  # (S, N) original positions

    @property
    def has_cls(self) -> bool:
        return bool(self.adapter.has_cls)

    def signal(self, name: str, sig: Signals, **kw: Any) -> Any:
        fn = getattr(self, f"_sig_{name}", None)
        if fn is None:
            raise KeyError(f"signal {name!r} is not available from the {self.adapter.family} adapter")
        return fn(sig, **kw)

    # ---------------------------------------------------------------- sequence signals
    def _sig_tokens(self, sig: Signals) -> torch.Tensor:
        if self.tokens is None:  # before the LLM: the (possibly merged) input embeddings
            return self.fwd.embeds[sig.rows[:, None], self._orig_of(sig)]
        return self.tokens[sig.rows[:, None], sig.positions]

    def _sig_prompt_positions(self, sig: Signals) -> torch.Tensor:
        mask = self.fwd.mask0.bool()
        first = (mask.long().cumsum(1) == 0).sum(1)  # (B,) left padding in front of each row
        return self._orig_of(sig) - first[sig.rows][:, None]

    def _sig_projected(self, sig: Signals) -> torch.Tensor:
        return self.fwd.projected[sig.rows[:, None], self._orig_of(sig)]

    def _sig_vit_depth(self, sig: Signals) -> int:
        return int(self.adapter.num_vit_layers())

    def _sig_grid(self, sig: Signals) -> torch.Tensor:
        return self.fwd.layout.grid[sig.rows[:, None], self._orig_of(sig)]

    def _sig_frame(self, sig: Signals) -> torch.Tensor:
        return self.fwd.layout.frame[sig.rows[:, None], self._orig_of(sig)]

    def _sig_instruction(self, sig: Signals) -> tuple[torch.Tensor, torch.Tensor]:
        sel = self._instruction_mask()[sig.rows]  # (S, L)
        T = max(int(sel.sum(1).max()), 1)
        order = torch.argsort(sel.to(torch.int8), dim=1, descending=True, stable=True)[:, :T]  # (S, T)
        emb = self.fwd.projected[sig.rows[:, None], order]  # (S, T, D)
        return emb, sel.gather(1, order)

    def _sig_hidden_prev(self, sig: Signals) -> torch.Tensor:
        cap = self.fwd.captures.get(("hidden", self.step.layer - 1))
        if cap is None:
            raise RuntimeError("hidden_prev was not captured (the method must list it in `requires`)")
        return cap["x"][sig.rows[:, None], self._captured(sig)]

    # ---------------------------------------------------------------- decoder-layer attention
    def _attn_ctx(self, which: str) -> dict[str, Any]:
        """q/k inputs of a decoder attention layer in some coordinates: ``"prev"`` = layer K-1 as captured
        (coordinates of the hidden states entering layer K), ``"self"`` = layer K on its own (current)
        input. Returns attn, x (normed input), cos/sin, attend (B, Lc), visual (B, Lc), to_slot (S, N
        candidates -> slots), and cached keys if any."""
        K = self.step.layer
        if which == "prev":
            key = ("ctx_prev", K)
            if key not in self.fwd.cache:
                cap = self.fwd.captures.get(("attn", K - 1))
                if cap is None:
                    raise RuntimeError("layer K-1 attention inputs were not captured (list the signal in `requires`)")
                cache, keys = cap.get("cache"), None
                if cache is not None and hasattr(cache, "layers") and len(cache.layers) > K - 1:
                    keys = getattr(cache.layers[K - 1], "keys", None)
                x = cap["x"]
                if keys is not None and keys.shape[-2] != x.shape[1]:
                    keys = None
                m = self.prev
                cos, sin = (t.expand(x.shape[0], *t.shape[1:]) for t in cap["pe"])  # (1, L, d) when unpadded
                self.fwd.cache[key] = {"attn": self.adapter.decoder_layers[K - 1].self_attn, "x": x,
                                       "cos": cos, "sin": sin, "keys": keys,
                                       "attend": self.fwd.attend(m).to(x.device),
                                       "orig": self.fwd.base.index.clamp(min=0).gather(1, m.index.clamp(min=0))}
            ctx = dict(self.fwd.cache[key])
            ctx["slots"] = self._captured
            return ctx
        if K is None or self.tokens is None or self.layer_kwargs is None:
            raise RuntimeError("layer='self' attention is only available at a decoder layer (layer=K)")
        if K not in self.adapter.attention_layers():
            raise ValueError(f"{self.step.method.name!r} reads the attention of decoder layer {K} itself, which is a "
                             f"{self.adapter.layer_type(K)} layer with no attention map; choose attention layers: "
                             f"{sorted(self.adapter.attention_layers())}")
        layer = self.adapter.decoder_layers[K]
        x = layer.input_layernorm(self.tokens)
        cur = self.cur
        pe = self.layer_kwargs.get("position_embeddings")
        index = cur.index.clamp(min=0)
        cos, sin = (take(t, index) for t in pe)
        return {"attn": layer.self_attn, "x": x, "cos": cos, "sin": sin, "keys": None,
                "attend": self.fwd.attend(cur).to(x.device),
                "orig": self.orig, "slots": lambda sig: sig.positions}

    def _project(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 key: bool) -> torch.Tensor:
        """Post-RoPE queries (or keys) (B, H, T, d) of ``attn`` for normed inputs x (B, T, D) (the adapter's)."""
        return self.adapter.decoder_qk(attn, x, cos, sin, key)

    def _ctx_keys(self, ctx: dict[str, Any]) -> torch.Tensor:
        if ctx["keys"] is None:
            ctx["keys"] = self._project(ctx["attn"], ctx["x"], ctx["cos"], ctx["sin"], key=True)
        return ctx["keys"]  # (B, Hkv, Lc, d)

    def _text_rows(self, ctx: dict[str, Any], query: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Tq) query slots and validity: the last attended token, or the text after the visual tokens."""
        attend = ctx["attend"]
        ar = torch.arange(attend.shape[1], device=attend.device)
        if query == "last":
            q_idx = (attend.long() * (ar + 1)).argmax(1, keepdim=True)  # (B, 1)
            return q_idx, torch.ones_like(q_idx, dtype=torch.bool)
        if query != "instruction":
            raise ValueError(f"text_attention: query={query!r}; allowed: 'last', 'instruction'")
        visual = self.fwd.layout.visual  # (B, L) in original positions
        vis = visual.gather(1, ctx["orig"]).to(attend.device)  # (B, Lc)
        # "after the visual tokens" in ORIGINAL positions, as the `instruction` signal reads it: text inside an
        # image (Mistral-3's [IMG_BREAK]) stays out when the image's last tokens were dropped by an earlier step
        last_vis = (visual.long() * torch.arange(1, visual.shape[1] + 1, device=visual.device)).argmax(1, keepdim=True)
        sel = attend & ~vis & (ctx["orig"].to(attend.device) > last_vis.to(attend.device))
        sel = torch.where(sel.any(1, keepdim=True), sel, attend & ~vis)
        T = int(sel.sum(1).max())
        q_idx = torch.argsort(sel.to(torch.int8), dim=1, descending=True, stable=True)[:, :T]
        return q_idx, sel.gather(1, q_idx)

    def _sig_text_attention(self, sig: Signals, query: str = "last", per_head: bool = False,
                            layer: str = "prev") -> torch.Tensor:
        key = ("text_attention", self.step.layer, query, per_head, layer)
        cacheable = layer == "prev"  # "self" depends on the current tokens of this step
        if not cacheable or key not in self.fwd.cache:
            ctx = self._attn_ctx(layer)
            value = self._text_attention(ctx, query, per_head)
            if not cacheable:
                slots = ctx["slots"](sig)
                return value.to(sig.device)[sig.rows[:, None], :, slots].transpose(1, 2) if per_head else \
                    value.to(sig.device)[sig.rows[:, None], slots]
            self.fwd.cache[key] = value
        scores = self.fwd.cache[key].to(sig.device)  # (B, Lc) or (B, H, Lc)
        slots = self._captured(sig)
        if per_head:
            return scores[sig.rows[:, None], :, slots].transpose(1, 2)  # (S, H, N)
        return scores[sig.rows[:, None], slots]  # (S, N)

    def _text_attention(self, ctx: dict[str, Any], query: str, per_head: bool) -> torch.Tensor:
        attn, x, cos, sin, attend = ctx["attn"], ctx["x"], ctx["cos"], ctx["sin"], ctx["attend"]
        q_idx, q_ok = self._text_rows(ctx, query)
        q = self._project(attn, take(x, q_idx), take(cos, q_idx), take(sin, q_idx), key=False)  # (B, H, Tq, d)
        k = self._ctx_keys(ctx)  # (B, Hkv, Lc, d)
        # only the Tq query rows, streamed over key blocks (vtprune.kernels): never an L x L map
        return attention_rows(q, k.to(q.dtype), scale=attn.scaling, key_valid=attend, query_pos=q_idx,
                              query_weight=q_ok.float(), reduce="none" if per_head else "mean")

    def _sig_text_attention_rows(self, sig: Signals) -> torch.Tensor:
        key = ("text_attention_rows", self.step.layer)
        if key not in self.fwd.cache:
            ctx = self._attn_ctx("prev")
            attn, x, cos, sin, attend = ctx["attn"], ctx["x"], ctx["cos"], ctx["sin"], ctx["attend"]
            q_idx, q_ok = self._text_rows(ctx, "instruction")  # (B, T)
            q = self._project(attn, take(x, q_idx), take(cos, q_idx), take(sin, q_idx), key=False)  # (B, H, T, d)
            k = self._ctx_keys(ctx).to(q.dtype)  # (B, Hkv, Lc, d)
            self.fwd.cache[key] = torch.stack([  # one query row at a time: (B, Lc) each, never an L x L map
                attention_rows(q[:, :, t : t + 1], k, scale=attn.scaling, key_valid=attend,
                               query_pos=q_idx[:, t : t + 1], query_weight=q_ok[:, t : t + 1].float())
                for t in range(q_idx.shape[1])], 1), q_ok  # (B, T, Lc), (B, T)
        rows, q_ok = self.fwd.cache[key]
        rows = rows.to(sig.device)
        slots = self._captured(sig)  # (S, N)
        # the `instruction` signal's width for these rows (valid tokens first, in order, in both)
        t = torch.arange(max(int(q_ok[sig.rows.to(q_ok.device)].sum(1).max()), 1), device=sig.device)
        return rows[sig.rows[:, None, None], t[None, :, None], slots[:, None, :]]  # (S, T, N)

    def _sig_prev_queries(self, sig: Signals) -> torch.Tensor:
        ctx = self._attn_ctx("prev")
        slots = ctx["slots"](sig)  # (S, N)
        rows = sig.rows[:, None].to(ctx["x"].device)
        x, cos, sin = (ctx[k][rows, slots.to(ctx["x"].device)] for k in ("x", "cos", "sin"))  # (S, N, .)
        return self._project(ctx["attn"], x, cos, sin, key=False).transpose(1, 2).to(sig.device)  # (S, N, H, d)

    def _after_span(self, sig: Signals, attend: torch.Tensor, orig: torch.Tensor,
                    slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, T) slots of the attended text tokens after each span's last candidate, and their mask."""
        vis = self.fwd.layout.visual.gather(1, orig).to(attend.device)[sig.rows]  # (S, Lc)
        ar = torch.arange(attend.shape[1], device=attend.device)
        after = attend[sig.rows] & ~vis & (ar[None] > slots.max(1, keepdim=True).values.to(attend.device))
        T = max(int(after.sum(1).max()), 1)
        idx = torch.argsort(after.to(torch.int8), dim=1, descending=True, stable=True)[:, :T]
        return idx, after.gather(1, idx)

    def _sig_prev_keys(self, sig: Signals, part: str = "visual") -> Any:
        """Post-RoPE keys of layer K-1 (before GQA repetition), (S, N, Hkv, d) at the candidates, or
        ((S, T, Hkv, d), mask) for ``part="text"``: the text after each span."""
        ctx = self._attn_ctx("prev")
        keys = self._ctx_keys(ctx).transpose(1, 2)  # (B, Lc, Hkv, d)
        slots = ctx["slots"](sig).to(keys.device)
        rows = sig.rows[:, None].to(keys.device)
        if part == "visual":
            return keys[rows, slots].to(sig.device)
        if part != "text":
            raise ValueError(f"prev_keys: part={part!r}; allowed: 'visual', 'text'")
        idx, ok = self._after_span(sig, ctx["attend"], ctx["orig"], slots)
        return keys[rows, idx.to(keys.device)].to(sig.device), ok.to(sig.device)

    def _sig_text_tokens(self, sig: Signals) -> tuple[torch.Tensor, torch.Tensor]:
        """((S, T, D), mask): the stage's representation of the text after each span."""
        if self.tokens is None:  # before the LLM: the input embeddings
            attend = self.fwd.mask0.bool()
            orig = torch.arange(attend.shape[1], device=attend.device).expand_as(attend)
            idx, ok = self._after_span(sig, attend, orig, self._orig_of(sig))
            return self.fwd.embeds[sig.rows[:, None], idx], ok
        attend = self.fwd.attend(self.cur)
        idx, ok = self._after_span(sig, attend, self.orig, sig.positions)
        return self.tokens[sig.rows[:, None], idx.to(self.tokens.device)], ok

    def _sig_final_norm(self, sig: Signals) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.adapter.language_model.norm

    def _sig_instruction_ids(self, sig: Signals) -> tuple[torch.Tensor, torch.Tensor]:
        """((S, T) token ids, mask) of the text after the sample's visual tokens (original prompt)."""
        if self.fwd.input_ids is None:
            raise RuntimeError("instruction_ids needs input_ids (the model was called with inputs_embeds)")
        sel = self._instruction_mask()[sig.rows]  # (S, L)
        T = max(int(sel.sum(1).max()), 1)
        order = torch.argsort(sel.to(torch.int8), dim=1, descending=True, stable=True)[:, :T]
        return self.fwd.input_ids[sig.rows[:, None], order], sel.gather(1, order)

    def _instruction_mask(self) -> torch.Tensor:
        fwd = self.fwd
        if "instruction" not in fwd.cache:
            lay = fwd.layout
            L = lay.visual.shape[1]
            last_vis = (lay.visual.long() * torch.arange(1, L + 1, device=lay.visual.device)).argmax(1)  # (B,)
            after = torch.arange(L, device=lay.visual.device)[None] > last_vis[:, None]
            sel = after & fwd.mask0.bool() & ~lay.visual
            fwd.cache["instruction"] = torch.where(sel.any(1, keepdim=True), sel, fwd.mask0.bool() & ~lay.visual)
        return fwd.cache["instruction"]

    # ---------------------------------------------------------------- vision-tower signals
    def _vit_rows(self, sig: Signals) -> torch.Tensor:
        src = self.fwd.layout.src[sig.rows[:, None], self._orig_of(sig)]  # (S, N)
        if bool((src < 0).any()):
            raise RuntimeError("vision-tower signals are unavailable for these tokens: their features were not "
                               "encoded while the model was pruned (pass the pixel values, or encode them after "
                               "prune())")
        return src

    def _stash(self, record: VisionRecord, key: Any) -> torch.Tensor:
        if key not in record.stash:
            raise RuntimeError(f"vision-tower signal {key!r} was not captured; was the feature call made?")
        return record.stash[key]

    def _vit_signal(self, name: str, sig: Signals, vit_layer: int | None) -> torch.Tensor:
        """A per-ViT-row signal mapped onto the LLM tokens by the adapter (gather, pooling, packing)."""
        compute = getattr(self.adapter, name)
        if name == "padding_fraction":  # a property of the input image, not of a ViT layer
            key, rows_of = (name,), lambda r: compute(r)
        else:
            h = self.adapter.feature_hidden_index(vit_layer)
            attn = self.adapter.vit_attention(h)
            key, rows_of = (name, h), lambda r: compute(attn, self._stash(r, ("vit_in", h)), r)
        self._vit_rows(sig)  # raises if a token has no known vision-tower source
        if key not in self.fwd.cache:
            parts = []
            for r in self.fwd.records:
                rows = rows_of(r).reshape(r.n_vit, -1)  # (n_vit, C)
                kind = "feature" if name == "vit_keys" else "score"
                blocks = self.adapter.rows_to_tokens(r, rows, kind)  # per produced image: (n_i, C)
                by_layout = {id(im): blk for im, blk in zip(r.produced, blocks)}
                parts += [by_layout[id(im)] for im in r.images]  # follows generate()'s repetition
            self.fwd.cache[key] = torch.cat(parts)
        vtok = self.fwd.layout.vtok[sig.rows[:, None], self._orig_of(sig)]  # (S, N)
        return self.fwd.cache[key].to(sig.device)[vtok]  # (S, N, C)

    def _sig_cls_attention(self, sig: Signals, vit_layer: int | None = None) -> torch.Tensor:
        return self._vit_signal("cls_attention", sig, vit_layer)[..., 0]  # (S, N)

    def _sig_received_attention(self, sig: Signals, vit_layer: int | None = None) -> torch.Tensor:
        return self._vit_signal("received_attention", sig, vit_layer)[..., 0]  # (S, N)

    def _sig_vit_keys(self, sig: Signals, vit_layer: int | None = None, heads: bool = False) -> torch.Tensor:
        keys = self._vit_signal("vit_keys", sig, vit_layer)  # (S, N, Dk)
        if not heads:
            return keys
        H, d = self.adapter.vit_heads(vit_layer)
        # (S, N, patches, H, d): a merged token (Qwen's 2x2, InternVL's shuffle) averages its patches' keys
        return keys.reshape(*keys.shape[:2], -1, H, d).mean(2)

    def _sig_vit_cls(self, sig: Signals, vit_layer: int | None = None) -> torch.Tensor:
        h = self.adapter.feature_hidden_index(vit_layer)
        src = self._vit_rows(sig)
        out, offset = None, 0
        for record in self.fwd.records:
            inside = (src >= offset) & (src < offset + record.n_vit)
            if bool(inside.any()):
                rows = self.adapter.vit_cls(record, self._stash(record, ("vit_out", h)),
                                            (src - offset).clamp(0, record.n_vit - 1))
                out = rows if out is None else torch.where(inside[..., None], rows, out)
            offset += record.n_vit
        return out.to(sig.device)  # (S, N, Dv)

    def _sig_padding_fraction(self, sig: Signals) -> torch.Tensor:
        return self._vit_signal("padding_fraction", sig, None)[..., 0]  # (S, N)

    def _sig_embed_tokens(self, sig: Signals) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.adapter.language_model.get_input_embeddings()

    def _sig_transition(self, sig: Signals, direction: str = "cos") -> torch.Tensor:
        """(S, N) the method's sub-layer statistic ``direction`` summed over its accumulation layers below K
        (TransPrune's token transition variation)."""
        K = self.step.layer
        total = None
        for (kind, l), parts in self.fwd.captures.items():
            if kind != "sublayers" or K is None or l >= K:
                continue
            value = parts[("attn", direction)] + parts[("mlp", direction)]  # (B, L0)
            total = value if total is None else total + value
        if total is None:
            raise RuntimeError("no sub-layer statistic was captured below this layer (check accumulate layers)")
        base = self.cur.index.clamp(min=0)[sig.rows[:, None], sig.positions]  # (S, N) LLM-input slots
        return total.to(sig.device)[sig.rows[:, None], base]

    def _sig_vit_features(self, sig: Signals) -> torch.Tensor:
        src = self._vit_rows(sig)  # (S, N) global ViT rows
        vtok = self.fwd.layout.vtok[sig.rows[:, None], self._orig_of(sig)]  # (S, N) global token index
        out, row_off, tok_off = None, 0, 0
        for record in self.fwd.records:
            n_tok = sum(im.num_tokens for im in record.images)
            inside = (vtok >= tok_off) & (vtok < tok_off + n_tok)
            if bool(inside.any()):
                rows = self.adapter.vit_feature_rows(record, (src - row_off).clamp(0, record.n_vit - 1),
                                                     (vtok - tok_off).clamp(0, n_tok - 1))
                out = rows if out is None else torch.where(inside[..., None], rows, out)
            row_off, tok_off = row_off + record.n_vit, tok_off + n_tok
        return out.to(sig.device)  # (S, N, Dfeat)

    def _sig_projector(self, sig: Signals) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.adapter.projector_fn()
