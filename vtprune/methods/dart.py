"""Duplication-aware pruning from pivot tokens (DART).

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(EMNLP 2025), arXiv:2502.11494. Official code: ZichenWen1/DART (read as vendored in
Chenfei-Liao/VTC-Bench ``external/DART/.../modeling_llama_self.py``, ``get_retained_image_token``).

At decoder layer K (default 2), from layer K-1: pivots are the 4 image tokens and the 4 text tokens
(after the image) with the largest L1 norm of their post-RoPE keys (all key heads concatenated). Hidden
states are compared after the LLM's final norm. Visiting the 8 pivots in the order of a Python ``set`` of
their sequence positions (as the reference does), each pivot adds the TOPK still-unchosen image tokens
least cosine-similar to it. The image pivots and the added tokens survive: 4 + 8 * TOPK tokens with
TOPK = R // 8 for a budget of R (``max_num_trunction``), so "64 / 128 / 192" keep 68 / 132 / 196.
Original positions kept.

Differences from the reference:
  * TOPK is clamped so that 4 + 8 * TOPK never exceeds the span (the reference crashes there).
  * Per span with batch > 1 (the reference: one image span at offset 35, batch size 1); on LLaVA-NeXT the
    reference treats base tile + crops + newlines as one span with R = 320, vtprune uses its per-image
    budget and never selects newlines.
  * A span without text after it (image last) uses only image pivots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.methods.base import LayerSpec, Method
from vtprune.signals import Signals
from vtprune.registry import METHODS


def dart_topk(budget: int, n: int, pivots: int = 4, text_pivots: int = 4) -> int:
    """TOPK of DART: R // (image + text pivots), clamped so that the kept count fits in the span."""
    per = max(1, pivots + text_pivots)
    return max(0, min(budget // per, (n - pivots) // per))


@METHODS.register("dart")
@dataclass(frozen=True, kw_only=True)
class DART(Method):
    """DART: pivots by key L1 norm, then the least duplicated tokens per pivot (layer K, default 2)."""

    name = "dart"
    stage = "layer"
    pre_llm_ok = False
    requires = frozenset({"tokens", "prev_keys", "text_tokens", "final_norm", "prompt_positions"})
    scored_at_previous_layer = True

    layer: LayerSpec = 2
    pivots: int = 4
    text_pivots: int = 4

    def validate(self) -> None:
        for name in ("pivots", "text_pivots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"dart: {name} must be an integer >= 0, got {v!r}")
        if self.pivots < 1:
            raise ValueError("dart: pivots must be >= 1")

    def keep_count(self, budget: Budget, n: int, n0: int, num_layers: int, layer: int | None) -> int:
        if budget.is_identity:
            return n
        pivots = min(self.pivots, n)
        return pivots + (self.pivots + self.text_pivots) * dart_topk(budget.count(n), n, pivots, self.text_pivots)

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        norm = sig.final_norm
        keys = sig.prev_keys("visual")  # (S, N, Hkv, d)
        text_keys, text_ok = sig.prev_keys("text")  # (S, T, Hkv, d), (S, T)
        h = norm(sig.tokens).float()  # (S, N, D)
        text_h, _ = sig.text_tokens
        text_h = norm(text_h).float()  # (S, T, D)
        S, N = h.shape[:2]
        p_img = min(self.pivots, N)
        topk = (k - p_img) // (self.pivots + self.text_pivots) if k > p_img else 0
        out = []
        for s in range(S):
            l1 = keys[s].flatten(1).float().abs().sum(-1)  # (N,)
            img_piv = torch.sort(l1, descending=True, stable=True).indices[:p_img]
            tl1 = text_keys[s].flatten(1).float().abs().sum(-1).masked_fill(~text_ok[s], float("-inf"))
            n_txt = min(self.text_pivots, int(text_ok[s].sum()))
            txt_piv = torch.sort(tl1, descending=True, stable=True).indices[:n_txt]
            # The reference visits the pivots in the iteration order of ``set(image_indices + query_indices)``:
            # a set built from that LIST of sequence positions (image pivots by key norm, then text pivots),
            # whose order depends on how the set grew; a set built from a dict is pre-sized and can iterate
            # differently. The text after a span follows it directly, so text pivot i sits at last + 1 + i.
            pos = sig.prompt_positions[s]  # positions in the unpadded prompt, as the reference (batch 1)
            img_pos = [int(pos[i]) for i in img_piv.tolist()]
            txt_pos = [int(pos[-1]) + 1 + int(i) for i in txt_piv.tolist()]
            lookup = {p: ("img", int(i)) for p, i in zip(img_pos, img_piv.tolist())}
            lookup.update({p: ("txt", int(i)) for p, i in zip(txt_pos, txt_piv.tolist())})
            valid = torch.ones(N, dtype=torch.bool, device=h.device)
            valid[img_piv] = False
            chosen = [img_piv]
            for p in list(set(img_pos + txt_pos)):
                kind, i = lookup[p]
                pivot = h[s, i] if kind == "img" else text_h[s, i]
                if topk == 0 or not bool(valid.any()):
                    continue
                sim = F.cosine_similarity(pivot[None], h[s], dim=-1).masked_fill(~valid, float("inf"))
                take = torch.sort(-sim, descending=True, stable=True).indices[: min(topk, int(valid.sum()))]
                chosen.append(take)
                valid[take] = False
            picked = torch.cat(chosen)
            if picked.numel() < k:  # ran out of pivots (no text after the span): fill by key norm
                rest = torch.sort(l1.masked_fill(~valid, float("-inf")), descending=True, stable=True).indices
                picked = torch.cat([picked, rest[: k - picked.numel()]])
            out.append(picked[:k])
        return torch.stack(out)
