"""Keep the tokens with the highest matrix entropy at the entropy-collapse layer (EntropyPrune).

Paper: "EntropyPrune: ..." arXiv:2602.17196. Official code: YahongWang1/EntropyPrune @ 9fc1cbb4
(``llava/model/language_model/modeling_llama_self.py``: ``maten_prune``, ``cal_cov``, ``cal_entropy_torch``).

Per visual token, its post-RoPE query of decoder layer K-1 is an H x d matrix (one row per head). Rows are
centred across heads (R = Q - mean_h Q) and the dual Gram A = R R^T / H (H x H instead of d x d: the same
non-zero spectrum, the paper's "64x" speed-up) is eigen-decomposed in float64; the score is
-sum(l * ln l) / ln H over the eigenvalues l clamped at 1e-10, without trace normalisation (as the code).
The highest-entropy tokens survive into layer K (default K = 2, the paper's entropy-collapse layer for
LLaVA-1.5 / 1.6; ``vtprune calibrate-entropy`` measures it for a given model). Original positions kept.

Budget (``budget_mode="average"``, default): the paper's token settings are averages over the L layers,
layers < K seeing all n tokens, so a budget of ``avg`` tokens keeps int((L * avg - K * n) / (L - K)) after
layer K: keep=64/128/192 gives 29/98/166 on LLaVA-1.5-7B (L=32, n=576). ``budget_mode="direct"`` keeps
the budget itself (the reference's LLaVA-NeXT script, 320).

Differences from the reference:
  * When the head dim exceeds 128, groups of head_dim / 128 adjacent dimensions are averaged (as the
    reference); below 128 no pooling is applied (the reference crashes there).
  * Per span (image / frame) with batch > 1; the reference prunes one image at offset 35, batch size 1.
  * When L * avg <= K * n the average cannot be reached; one token is kept rather than raising mid-run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.budget import Budget
from vtprune.methods.base import LayerSpec, ScoreMethod, check_finite
from vtprune.signals import Signals
from vtprune.registry import METHODS


def matrix_entropy(q: torch.Tensor) -> torch.Tensor:
    """Per-token matrix entropy of q (S, N, H, d) -> (S, N), as EntropyPrune's ``cal_entropy_torch``."""
    S, N, H, d = q.shape
    if d > 128 and d % 128 == 0:  # the reference averages groups of d // 128 adjacent dims
        q = q.reshape(S, N, H, 128, d // 128).mean(-1)
    r = q.double() - q.double().mean(dim=2, keepdim=True)  # centre across heads
    gram = r @ r.transpose(-1, -2) / H  # (S, N, H, H): dual Gram
    lam = torch.linalg.eigvalsh(gram).clamp(min=1e-10)  # (S, N, H)
    return (-(lam * lam.log()).sum(-1) / math.log(H)).float()


@METHODS.register("entropy", aliases=("entropyprune",))
@dataclass(frozen=True, kw_only=True)
class EntropyPrune(ScoreMethod):
    """Highest per-token matrix entropy of layer K-1's queries survive into layer K (default 2)."""

    name = "entropy"
    stage = "layer"
    pre_llm_ok = False
    requires = frozenset({"prev_queries"})
    scored_at_previous_layer = True

    layer: LayerSpec = 2
    budget_mode: str = "average"

    def validate(self) -> None:
        if self.budget_mode not in ("average", "direct"):
            raise ValueError(f"entropy: budget_mode={self.budget_mode!r}; allowed: 'average', 'direct'")

    def keep_count(self, budget: Budget, n: int, n0: int, num_layers: int, layer: int | None) -> int:
        if self.budget_mode == "direct" or layer is None:
            return budget.count(n)
        avg = budget.count(n0)  # the average number of visual tokens per layer the budget asks for
        return max(1, int((num_layers * avg - layer * n) / (num_layers - layer)))

    def score(self, sig: Signals) -> torch.Tensor:
        return matrix_entropy(sig.prev_queries)  # (S, N)


# ---------------------------------------------------------------------------------------------- whole-model entropy
def global_matrix_entropy(x: torch.Tensor) -> float:
    """Matrix (von Neumann) entropy of token representations x (N, D): rows L2-normalised, the trace-one
    Gram X X^T / N eigen-decomposed (its spectrum equals the covariance's), divided by ln min(N, D)."""
    check_finite(x, owner="entropy", what="hidden-state value")  # eigvalsh would fail with a raw LinAlgError
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    lam = torch.linalg.eigvalsh(xn @ xn.T / xn.shape[0]).clamp(min=1e-12)
    return float(-(lam * lam.log()).sum() / math.log(min(x.shape)))


def collapse_layer(curve: list[float]) -> int:
    """The entropy-collapse layer: the layer whose output shows the largest one-step drop of the visual
    tokens' matrix entropy. ``curve[l]`` is the entropy of the INPUT of decoder layer l, so a drop between
    l-1 and l happens in layer l-1; EntropyPrune then prunes at the input of layer l (its ``layer=l``)."""
    drops = [curve[l - 1] - curve[l] for l in range(1, len(curve))]
    return 1 + max(range(len(drops)), key=lambda i: (drops[i], -i))
