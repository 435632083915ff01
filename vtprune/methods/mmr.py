"""Maximal Marginal Relevance between importance and diversity (IDPruner).

Paper: "IDPruner: ..." (Tencent AngelSlim), arXiv:2602.13315. Official code: Tencent/AngelSlim
``angelslim/compressor/token_compressor/algorithm/idpruner.py`` (Alg. 1 of the paper).

Importance w is min-max normalised, Imp = (w - min) / (max - min + 1e-6); similarity is the cosine of
the projected visual tokens (the LLM input). Greedy: the first pick maximises Imp; every next pick
maximises lam * Imp_i - (1 - lam) * max_{j selected} sim(i, j) (lam = 0.5, one token per step:
``parallel_k=1``). Kept tokens keep their order and positions.

Differences from the reference:
  * Importance. The official score comes from a *trained* VisionSelector (per-model weights on the HF
    hub) fed only the visual tokens; none can be downloaded here. vtprune ships training-free
    importances: ``importance="cls"`` (default: FasterVLM's [CLS] attention of the ViT feature layer, the
    closest vision-only analogue; mean received attention on towers without [CLS], AngelSlim's own
    CLS-free choice) or ``"instruction"`` (MMTok's text->vision coverage mass of the instruction
    keywords), or any callable ``importance(signals) -> (S, N)`` (e.g. selector scores computed
    elsewhere). The paper's numbers (92.34% at 64 tokens on LLaVA-1.5-7B) need the selector and do not
    transfer to these importances.
  * The running max similarity starts at -2 in the code and -1 in the paper; it never enters a score
    (the first pick uses importance only), so this is moot.
  * Ties go to the earlier token (the reference's ``topk`` leaves them unspecified); per-span budgets
    (``budget="global"`` pools a sample's images as AngelSlim does); batch > 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vtprune.kernels import greedy_mmr
from vtprune.methods._instruction import instruction_embeddings, text_coverage
from vtprune.methods.base import Method
from vtprune.signals import Signals
from vtprune.registry import METHODS


def normalise(w: torch.Tensor) -> torch.Tensor:
    """Min-max per span, as AngelSlim's default ``importance_func``: (S, N) -> [0, 1)."""
    w = w.float()
    lo, hi = w.min(-1, keepdim=True).values, w.max(-1, keepdim=True).values
    return (w - lo) / (hi - lo + 1e-6)


def mmr(x: torch.Tensor, importance: torch.Tensor, k: int, lam: float = 0.5, parallel_k: int = 1) -> torch.Tensor:
    """Greedy MMR on tokens x (S, N, D) with normalised importance (S, N) -> (S, k) picks in order."""
    S, N, _ = x.shape
    xn = F.normalize(x.float(), dim=-1, eps=1e-8)
    sim = xn @ xn.transpose(1, 2)  # (S, N, N)
    rows = torch.arange(S, device=x.device)
    best = torch.full((S, N), -2.0, device=x.device)  # running max similarity to the selected set
    taken = torch.zeros(S, N, dtype=torch.bool, device=x.device)
    picks: list[torch.Tensor] = []
    while len(picks) < k:
        step = min(parallel_k, k - len(picks))
        score = importance if not picks else lam * importance - (1 - lam) * best  # (S, N)
        score = score.masked_fill(taken, float("-inf"))
        chosen = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :step]  # (S, step)
        for j in range(step):
            picks.append(chosen[:, j])
        taken[rows[:, None], chosen] = True
        best = torch.maximum(best, sim[rows[:, None], :, chosen].amax(1) if step > 1 else sim[rows, :, chosen[:, 0]])
    return torch.stack(picks, 1)  # (S, k)


@METHODS.register("mmr", aliases=("idpruner",))
@dataclass(frozen=True, kw_only=True)
class MMR(Method):
    """IDPruner's MMR of a training-free importance and cosine diversity of the projected tokens."""

    name = "mmr"
    stage = "input"
    requires = frozenset({"tokens"})

    lam: float = 0.5
    importance: str | Callable[[Signals], torch.Tensor] = "cls"
    parallel_k: int = 1
    tau_text: float = 0.02  # temperature of the "instruction" importance (MMTok's)
    tokenizer: Any = field(default=None, compare=False, repr=False)  # "instruction": MMTok keywords if given

    def validate(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"mmr: lam must be in [0, 1], got {self.lam!r}")
        if not callable(self.importance) and self.importance not in ("cls", "instruction"):
            raise ValueError(f"mmr: importance={self.importance!r}; allowed: 'cls', 'instruction' or a callable")
        if isinstance(self.parallel_k, bool) or not isinstance(self.parallel_k, int) or self.parallel_k < 1:
            raise ValueError(f"mmr: parallel_k must be an integer >= 1, got {self.parallel_k!r}")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        if self.importance == "cls":
            return self.requires | {"cls_attention" if has_cls else "received_attention"}
        if self.importance == "instruction":
            return self.requires | {"instruction", "instruction_ids", "embed_tokens"}
        return self.requires

    def importance_of(self, sig: Signals) -> torch.Tensor:
        if callable(self.importance):
            w = self.importance(sig)
        elif self.importance == "cls":
            w = sig.cls_attention() if sig.has_cls else sig.received_attention()
        else:  # the instruction keywords' coverage mass on each token (MMTok's P summed over text)
            z, z_mask = instruction_embeddings(sig, self.tokenizer)
            w = text_coverage(z, z_mask, sig.tokens, self.tau_text).sum(1)
        return normalise(w)  # (S, N)

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        if self.parallel_k == 1:  # the classic loop: one fused kernel launch per pick
            return greedy_mmr(sig.tokens, self.importance_of(sig), k, self.lam)
        return mmr(sig.tokens, self.importance_of(sig), k, self.lam, self.parallel_k)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer", None)
        if callable(self.importance):
            out["importance"] = getattr(self.importance, "__qualname__", repr(self.importance))
        return out
