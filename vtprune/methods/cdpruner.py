"""Conditional diversity: a determinantal point process over visual tokens conditioned on the instruction (CDPruner).

Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs" (NeurIPS 2025),
arXiv:2506.10967. Official code: Theia-4869/CDPruner @ 9541616 (``llava/model/llava_arch.py`` ``encode_images``,
``llava/model/multimodal_encoder/clip_encoder.py``).

Kernel: S = cosine similarity of the projected visual tokens (the LLM input; no rescaling, entries may be negative);
relevance r in [0, 1] of each token to the instruction; L = diag(r) S diag(r). Selection: the fast greedy MAP of
Chen et al. (2018) with incremental Cholesky rows: d^2 = diag(L); k times, j = argmax d^2 (first index on ties),
e = (L_j - sum_s C_s[j] C_s) / sqrt(d^2_j), C_t = e, d^2 <- d^2 - e^2, d^2_j <- -inf. Kept tokens keep their order.

Relevance (``relevance=``):

* ``"clip"`` (the official LLaVA recipe): the CLIP text tower's pooled embedding t of the question (77-token chunks,
  averaged) against v_i = visual_projection(post_layernorm(h_i)) of the ViT feature-layer patches h; r~ = -cos(v, t)
  (the minus sign is the official code's, CLIP-specific by the authors' account, issues #14 / #22), then min-max:
  r = (r~ - min + 1e-6) / (max - min). Needs ``clip=`` (a ``CLIPModel`` of the tower's checkpoint, e.g.
  openai/clip-vit-large-patch14-336 for LLaVA-1.5), ``clip_tokenizer=`` and the LLM's ``tokenizer=`` (to read the
  question back from the prompt).
* ``"instruction"`` (default; the paper's pipeline figure and the only option on models without a CLIP text tower):
  r~_i = mean over the instruction tokens of cos(x_i, z_t), x the projected tokens, z the LLM input embeddings of the
  text after the visual tokens; r = (r~ - min) / (max - min + 1e-6), no minus sign.

``theta`` (commented out in the official code, 0.5 there): r <- exp(alpha r), alpha = theta / (2 (1 - theta)).

Differences from the reference:
  * Default relevance ``"instruction"``: a stock Hugging Face VLM carries no CLIP text tower; ``relevance="clip"``
    with a CLIPModel reproduces the official LLaVA recipe. Its question is the prompt's text after the image with
    LLaVA's evaluation suffix and the chat template's assistant marker removed (the reference passes the raw question).
  * Min-max per span (image) instead of over the whole batch (the reference runs batch 1).
  * More picks than the kernel's rank (k > feature width, zero relevance) give NaN / repeated picks in the
    reference; vtprune's remaining picks follow relevance once d^2 <= 1e-5 of the largest diagonal entry (rounding
    noise), so exactly k distinct tokens are kept, the same under any attention kernel.
  * LLaVA-NeXT: one DPP per image over base tile and crops (the reference: k per crop, its own kernel per crop, no
    unpadding, no newlines). Original positions by default (the reference renumbers; ``positions="compact"``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vtprune.methods._instruction import SUFFIXES
from vtprune.methods.base import Method, check_finite
from vtprune.signals import Signals
from vtprune.registry import METHODS

RELEVANCE = ("instruction", "clip")


def dpp_greedy(kernel: torch.Tensor, k: int, fallback: torch.Tensor | None = None, eps: float = 1e-10,
               exhausted: float = 1e-5) -> torch.Tensor:
    """Fast greedy MAP inference (Chen et al. 2018) for kernels (S, N, N) -> (S, k) picks in order.

    Once a row's kernel is exhausted (every unselected d^2 <= ``exhausted`` x its largest diagonal entry: the picks
    span its rank, e.g. more picks than feature dimensions, or zero relevance) d^2 is rounding noise; that row's
    remaining picks follow ``fallback`` (S, N) (highest first, earlier on ties), or token order without it."""
    S, N, _ = kernel.shape
    rows = torch.arange(S, device=kernel.device)
    d2 = kernel.diagonal(dim1=1, dim2=2).clone().float()  # (S, N)
    floor = exhausted * d2.amax(-1).clamp(min=eps)  # (S,)
    rest = fallback.float() if fallback is not None else -torch.arange(N, device=kernel.device).float().expand(S, N)
    chol = torch.zeros(k, S, N, dtype=torch.float32, device=kernel.device)  # incremental Cholesky rows
    taken = torch.zeros(S, N, dtype=torch.bool, device=kernel.device)
    picks = []
    for t in range(k):
        gain = torch.nan_to_num(d2, nan=-3e38, posinf=3e38, neginf=-3e38).masked_fill(taken, float("-inf"))
        done = gain.amax(-1) <= floor  # (S,) rows whose kernel is exhausted
        score = torch.where(done[:, None], rest.masked_fill(taken, float("-inf")), gain)
        j = score.argmax(-1)  # (S,) first index on ties
        picks.append(j)
        taken[rows, j] = True
        proj = (chol[:t, rows, j][..., None] * chol[:t]).sum(0) if t else 0.0  # (S, N) sum_s C_s[j] C_s
        dj = torch.nan_to_num(d2[rows, j], nan=eps).clamp(min=eps)
        chol[t] = torch.nan_to_num((kernel[rows, j].float() - proj) / dj.sqrt()[:, None])
        d2 = d2 - chol[t].pow(2)
    return torch.stack(picks, 1)


def minmax(r: torch.Tensor, official_clip: bool) -> torch.Tensor:
    """Per span: (r - min + 1e-6) / (max - min) for the CLIP recipe (its epsilon placement), else
    (r - min) / (max - min + 1e-6)."""
    lo, hi = r.min(-1, keepdim=True).values, r.max(-1, keepdim=True).values
    if official_clip:
        return (r - lo + 1e-6) / (hi - lo).clamp(min=1e-12)
    return (r - lo) / (hi - lo + 1e-6)


_ROLE = re.compile(r"\s*(ASSISTANT|Assistant|assistant|GPT|gpt)\s*:?\s*$")


def question_text(decoded: str) -> str:
    """The question in a decoded prompt tail: evaluation suffixes and a trailing assistant marker removed."""
    text = decoded
    for suffix in SUFFIXES:
        text = text.replace(suffix, "")
    return _ROLE.sub("", text.strip()).strip()


def clip_text_embedding(clip: Any, clip_tokenizer: Any, text: str, device: torch.device) -> torch.Tensor:
    """(Dp,) the CLIP text tower's projected, pooled embedding of ``text``: 77-token chunks (zero-padded, the
    reference's chunking of long questions), averaged."""
    ids = clip_tokenizer(text, truncation=False, return_tensors="pt")["input_ids"][0]
    ctx = int(clip.config.text_config.max_position_embeddings)
    chunks = torch.zeros(math.ceil(ids.numel() / ctx) * ctx, dtype=torch.long)
    chunks[: ids.numel()] = ids
    out = clip.get_text_features(input_ids=chunks.reshape(-1, ctx).to(device))
    out = getattr(out, "pooler_output", out)  # transformers 5 returns a model output
    return F.normalize(out.float(), dim=-1).mean(0)


@METHODS.register("cdpruner")
@dataclass(frozen=True, kw_only=True)
class CDPruner(Method):
    """Greedy MAP of the DPP with kernel diag(r) S diag(r): instruction relevance times token similarity."""

    name = "cdpruner"
    stage = "input"
    requires = frozenset({"tokens", "instruction"})

    relevance: str = "instruction"
    theta: float | None = None
    clip: Any = field(default=None, compare=False, repr=False)  # "clip": a transformers CLIPModel
    clip_tokenizer: Any = field(default=None, compare=False, repr=False)
    tokenizer: Any = field(default=None, compare=False, repr=False)  # "clip": the LLM's, to read the question

    def validate(self) -> None:
        if self.relevance not in RELEVANCE:
            raise ValueError(f"cdpruner: relevance={self.relevance!r}; allowed: {', '.join(map(repr, RELEVANCE))}")
        if self.theta is not None and (isinstance(self.theta, bool) or not 0.0 <= self.theta < 1.0):
            raise ValueError(f"cdpruner: theta must be in [0, 1) or None, got {self.theta!r}")
        if self.relevance == "clip" and (self.clip is None or self.clip_tokenizer is None or self.tokenizer is None):
            raise ValueError("cdpruner: relevance='clip' needs clip= (a CLIPModel of the vision tower's checkpoint), "
                             "clip_tokenizer= and tokenizer= (the LLM's); relevance='instruction' needs none")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        if self.relevance == "clip":
            return frozenset({"tokens", "vit_features", "instruction_ids"})
        return self.requires

    def relevance_of(self, sig: Signals) -> torch.Tensor:
        """(S, N) relevance r in [0, 1] (before theta)."""
        if self.relevance == "instruction":
            z, mask = sig.instruction  # (S, T, D), (S, T)
            cos = F.normalize(sig.tokens.float(), dim=-1) @ F.normalize(z.float(), dim=-1).transpose(1, 2)  # (S, N, T)
            w = mask.float()[:, None, :]
            return minmax((cos * w).sum(-1) / w.sum(-1).clamp(min=1), official_clip=False)
        ids, mask = sig.instruction_ids
        vision = self.clip.vision_model
        h = vision.post_layernorm(sig.vit_features.to(vision.post_layernorm.weight.dtype))
        v = F.normalize(self.clip.visual_projection(h).float(), dim=-1)  # (S, N, Dp)
        out = []
        for s in range(ids.shape[0]):
            text = question_text(self.tokenizer.decode(ids[s][mask[s]].tolist(), skip_special_tokens=True))
            t = clip_text_embedding(self.clip, self.clip_tokenizer, text, v.device)  # (Dp,)
            out.append(-(v[s] @ t))  # the official negative cosine
        return minmax(torch.stack(out), official_clip=True)

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        r = check_finite(self.relevance_of(sig), owner=self.name, what="relevance")  # (S, N)
        if self.theta is not None:
            r = torch.exp(self.theta / (2 * (1 - self.theta)) * r)
        x = F.normalize(sig.tokens.float(), dim=-1)
        kernel = r[:, :, None] * (x @ x.transpose(1, 2)) * r[:, None, :]  # (S, N, N)
        return dpp_greedy(kernel, k, fallback=r).sort(-1).values  # (S, k) kept order

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("clip", "clip_tokenizer", "tokenizer"):
            out.pop(key, None)
        return out
