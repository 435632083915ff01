"""Greedy maximum coverage of the instruction and of the image (MMTok).

Paper: "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs" (ICLR 2026),
arXiv:2508.18264. Official code: Ironieser/MMTok (``core/semantic_selector.py``, ``core/text_processor.py``).

Coverage matrix C = [P; alpha * Q] over candidate columns j:
  P (m, N) = softmax_j(cos(z_t, x_j) / 0.02) / m  — instruction keyword embeddings z vs projected tokens x;
  Q (N, N) = softmax_j(cos(x'_i, x'_j) / 0.2) / N  — pre-projector ViT features x' of every token i;
alpha = 0.5. Greedy: gain_j = sum_i max(C_ij - best_i, 0); pick argmax; best = max(best, C[:, j]).
The objective is monotone submodular, so the greedy is a (1 - 1/e) approximation. LLaVA-1.5 patches lying
entirely in the pad-to-square band are excluded, but never so that fewer tokens than the budget remain.

Differences from the reference:
  * The question: the reference captures the user turn from LLaVA's conversation object; vtprune takes
    the text after the visual tokens. With ``tokenizer=`` it decodes it and applies MMTok's keyword rule
    (suffixes, ``\\w+`` words, the 47 stop words, word-wise re-tokenisation, BOS dropped); without one it
    embeds every text token after the image (chat-template words included).
  * Padding is found from the pixels (the constant mean-colour fill of ``expand2square``), not from the
    original image size; the reference's rule (only patches entirely inside the band) is kept. When
    fewer valid patches than the budget remain, the greedy continues over the padding patches so exactly
    k distinct tokens survive (the reference repeats token 0).
  * LLaVA-NeXT: one selection per image over base tile and canvas with vtprune's per-image budget (the
    reference selects the same count in every crop and drops newlines); videos and batches > 1 work (the
    reference lists video as TODO, batch size 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vtprune.kernels import greedy_coverage as kernel_coverage
from vtprune.methods._instruction import instruction_embeddings, text_coverage
from vtprune.methods.base import Method
from vtprune.signals import Signals
from vtprune.registry import METHODS


def vision_coverage(xv: torch.Tensor, tau: float) -> torch.Tensor:
    """Q (S, N, N): row i = softmax over candidates j of cos(x'_i, x'_j) / tau, divided by N."""
    xn = F.normalize(xv.float(), dim=-1, eps=1e-8)
    return ((xn @ xn.transpose(1, 2)) / tau).softmax(-1) / xv.shape[1]


def greedy_coverage(cov: torch.Tensor, k: int, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max coverage on cov (S, M, N) -> (S, k) picks. Excluded columns (S, N) are taken only once
    every other column is, so k distinct columns always come out."""
    S, M, N = cov.shape
    rows = torch.arange(S, device=cov.device)
    best = torch.zeros(S, M, device=cov.device)
    taken = torch.zeros(S, N, dtype=torch.bool, device=cov.device)
    low = excluded if excluded is not None else torch.zeros_like(taken)
    picks = []
    for _ in range(k):
        gain = (cov - best[..., None]).clamp(min=0).sum(1)  # (S, N)
        free = ~taken
        valid = free & ~low
        allowed = torch.where(valid.any(-1, keepdim=True), valid, free)  # excluded ones only when needed
        j = gain.masked_fill(~allowed, float("-inf")).argmax(-1)  # (S,), first index on ties
        picks.append(j)
        taken[rows, j] = True
        best = torch.maximum(best, cov[rows, :, j])
    return torch.stack(picks, 1)


@METHODS.register("coverage", aliases=("mmtok",))
@dataclass(frozen=True, kw_only=True)
class Coverage(Method):
    """MMTok: greedy coverage of the instruction keywords and of the image's own features."""

    name = "coverage"
    stage = "input"
    requires = frozenset({"tokens", "vit_features", "instruction", "instruction_ids", "embed_tokens",
                          "padding_fraction"})

    alpha: float = 0.5
    tau_text: float = 0.02
    tau_vision: float = 0.2
    exclude_padding: bool = True
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def validate(self) -> None:
        for name in ("alpha", "tau_text", "tau_vision"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"coverage: {name} must be a positive number, got {value!r}")

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        z, z_mask = instruction_embeddings(sig, self.tokenizer)
        p = text_coverage(z, z_mask, sig.tokens, self.tau_text)  # (S, T, N)
        q = vision_coverage(sig.vit_features, self.tau_vision)  # (S, N, N)
        cov = torch.cat([p, self.alpha * q], dim=1)  # (S, T + N, N)
        excluded = sig.padding_fraction >= 1.0 if self.exclude_padding else None  # entirely inside the band
        if excluded is None or bool(((~excluded).sum(-1) >= k).all()):  # the fused kernel path
            return kernel_coverage(cov, k, None if excluded is None else ~excluded)
        return greedy_coverage(cov, k, excluded)  # too few valid patches: padding ones fill the budget

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer", None)
        return out
