"""FastV: drop the visual tokens the last prompt token attends to least, from decoder layer K on.

Paper: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024), arXiv:2403.06764.
Official code: pkunlp-icler/FastV (``fast_v_agg_layer`` K=2, ``fast_v_attention_rank`` / ratio R=50%).

Score of visual token j: the head-mean softmax attention of the last prompt token to j in layer K-1
(the attention returned by layer K-1 in the official code); the top-k survive into layers K.. and the
KV cache. Original positions are kept (the official in-place variant passes the kept indices as
``position_ids``).

Differences from the reference:
  * The attention row is recomputed from layer K-1's query of the last token and its cached keys,
    so the LLM runs under sdpa / flash-attention; the official code needs eager attention and the
    full attention maps of the whole model.
  * "Last token" is the last non-padding token of each row, so batches with padding work; the
    official code assumes batch size 1 and a fixed system-prompt length (35/36 tokens).
  * The budget is per span (image / frame) instead of one fixed 576-token image block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import LayerSpec, ScoreMethod
from vtprune.signals import Signals
from vtprune.registry import METHODS


@METHODS.register("fastv")
@dataclass(frozen=True, kw_only=True)
class FastV(ScoreMethod):
    """Last-token attention at layer K-1 (head mean); prunes at the input of layer K (default 2)."""

    name = "fastv"
    stage = "layer"
    pre_llm_ok = False
    requires = frozenset({"text_attention"})
    scored_at_previous_layer = True

    layer: LayerSpec = 2

    def score(self, sig: Signals) -> torch.Tensor:
        return sig.text_attention("last")  # (S, N)
