"""Text-guided progressive sparsification with token recycling (SparseVLM v1.5).

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (ICML 2025),
arXiv:2410.04417. Official code: Gumpest/SparseVLMs @ 26a5f48 (``llava/model/language_model/modelling_sparse_llama.py``,
``score.py``, ``utils.py``); its default ``USE_VERSION=1_0`` runs the v1.5 algorithm, which this file reproduces.

* Raters, once per prompt from the LLM input embeddings: M = softmax over the text tokens after the image of the raw
  products V T^T (visual rows), m = M averaged over the visual tokens; the text tokens with m above its mean rate.
* Sparsification after decoder layers 2, 6 and 15 (vtprune: at the input of layers 3, 7, 16, scaled by L / 32): each
  visual token's score is that layer's attention from the raters (head mean, mean over raters); the top
  min(K_i, n - 1) survive (kept order).
* Recycling: of the n_D dropped tokens, the int(0.3 n_D) + 1 of highest score are clustered by DPC-kNN on their
  hidden states (c = int(m / 10) + 1 clusters of m tokens: distances / sqrt(D), density exp(-mean squared distance to
  the c nearest, itself included), centres = top-c of density x distance to the nearest denser token, every token to
  its nearest centre) and each cluster's mean joins the visual tokens.

Budget (the paper's rows; K_i per pruning layer): 192 -> [300, 200, 110], 128 -> [303, 110, 36], 96 -> [238, 48, 26],
64 -> [66, 30, 17] (the released lists; clusters come on top: 64 feeds 82 / 32 / 18). Other k scale the list of the
nearest of these budgets by k / that budget.

Differences from the reference:
  * A recycled cluster rides in the slot of its centre token, at that token's original position (vtprune cannot
    insert tokens; the reference inserts the clusters after the kept visual tokens and renumbers positions).
  * Raters are recomputed at each stage from the candidates that reach it (the reference rates once against all
    visual tokens; the first stage is identical).
  * Density ties are broken by token order (the reference adds U(0, 1e-6) noise); scores from q/k rows, never the
    L x L maps the reference builds (it needs SDPA-with-weights in every layer on ``main``).
  * Where K_i + clusters(n - K_i) = K_i + 1 + clusters(n - K_i - 1) (a cluster-count boundary, ~3% of stages), one
    more token survives instead of one more cluster (the step's count is their sum).
  * Batch > 1 and several images (the reference: batch 1, one image); per span budgets.
  * SparseVLM+ (``USE_VERSION=2_0``: RoPE gravity correction, top-14 heads, no recycling) and the rank-adaptive v1.0
    are not reproduced; ``recycle=False`` gives v1.5 without recycling.
  * ``raters="all"`` (not in the reference) lets every text token after the image rate: where the rater softmax over
    raw input-embedding products singles out one token (on the synthetic LLaVA here, "?" for every question, whose
    layer-0 attention misses the objects), the paper's rule degrades and "all" does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.budget import Budget
from vtprune.methods.base import LayerSpec, Method, Selection, check_finite
from vtprune.signals import Signals
from vtprune.registry import METHODS

REF_LAYERS = (3, 7, 16)  # 32 layers: pruning after layers 2, 6, 15 = at the input of 3, 7, 16
LISTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}  # v1.5 (score.py)


def stage_lists(k: int) -> tuple[int, ...]:
    """K_i per pruning layer for an average budget k: the released list, or the nearest one scaled by k / budget."""
    if k in LISTS:
        return LISTS[k]
    ref = min(LISTS, key=lambda b: (abs(b - k), b))
    return tuple(max(1, round(v * k / ref)) for v in LISTS[ref])


def clusters_for(n_dropped: int) -> tuple[int, int]:
    """(recycled tokens, clusters) for n_dropped pruned tokens: int(0.3 n) + 1 tokens, int(that / 10) + 1 clusters."""
    m = int(n_dropped * 0.3) + 1 if n_dropped else 0
    return m, (int(m / 10) + 1 if m else 0)


def split(n: int, total: int) -> tuple[int, int]:
    """(survivors, clusters) of a stage keeping ``total`` of n tokens with recycling: the largest survivor count s
    with s + clusters(n - s) = total (s alone when no split fits, e.g. total = n)."""
    for kept in range(min(total, n), -1, -1):
        if kept + clusters_for(n - kept)[1] == total:
            return kept, total - kept
    return min(total, n), 0


def raters(v: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor) -> torch.Tensor:
    """(S, T) bool: text tokens whose visual-averaged softmax relevance exceeds its mean. v (S, N, D) visual and
    t (S, T, D) text input embeddings, t_mask (S, T)."""
    logits = (v.float() @ t.float().transpose(1, 2)).masked_fill(~t_mask[:, None, :], float("-inf"))  # (S, N, T)
    m = logits.softmax(-1).mean(1)  # (S, T)
    mean = (m * t_mask).sum(-1, keepdim=True) / t_mask.sum(-1, keepdim=True).clamp(min=1)
    return (m > mean) & t_mask


def density_peaks(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of tokens x (m, D): (distances (m, m) = cdist / sqrt(D), score (m,) = delta * density), density from
    the k nearest (self included), delta the distance to the nearest denser token. Ties in density go to the earlier
    token (the references add random noise)."""
    m, D = x.shape
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / D**0.5  # (m, m)
    density = (-dist.topk(min(k, m), dim=-1, largest=False).values.pow(2).mean(-1)).exp()  # (m,)
    order = torch.arange(m, device=x.device)
    same = density[None, :] == density[:, None]
    denser = (density[None, :] > density[:, None]) | (same & (order[None] < order[:, None]))
    delta = torch.where(denser, dist, dist.max()).min(-1).values  # (m,) distance to the nearest denser token
    return dist, delta * density


def dpc_knn(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of one span's tokens x (m, D) into c clusters (k = c neighbours, as SparseVLM): (centres (c,) indices
    into x, assignment (m,))."""
    dist, score = density_peaks(x, c)
    centres = torch.sort(score, descending=True, stable=True).indices[:c]
    assign = dist[:, centres].argmin(-1)  # (m,)
    assign[centres] = torch.arange(c, device=x.device)  # a centre joins its own cluster
    return centres, assign


@METHODS.register("sparsevlm")
@dataclass(frozen=True, kw_only=True)
class SparseVLM(Method):
    """Rater-text attention at layers (3, 7, 16), K_i survivors per stage, dropped tokens recycled into clusters."""

    name = "sparsevlm"
    stage = "layer"
    pre_llm_ok = False
    requires = frozenset({"text_attention_rows", "projected", "instruction", "tokens"})
    scored_at_previous_layer = True
    reference_layers = REF_LAYERS

    layer: LayerSpec = None  # None: (3, 7, 16) scaled to the model's depth
    recycle: bool = True
    raters: str = "relevance"  # "relevance": the paper's rater rule; "all": every text token after the image rates

    def validate(self) -> None:
        if self.raters not in ("relevance", "all"):
            raise ValueError(f"sparsevlm: raters={self.raters!r}; allowed: 'relevance', 'all'")
        if not isinstance(self.recycle, bool):
            raise ValueError(f"sparsevlm: recycle must be True or False, got {self.recycle!r}")
        if self.layer is not None and len(self.layers) > len(REF_LAYERS):
            raise ValueError(f"sparsevlm: at most {len(REF_LAYERS)} pruning layers (its budget lists have 3 stages), "
                             f"got layer={self.layer!r}")

    def survivors(self, budget: Budget, n: int, n0: int, layer: int) -> int:
        """Tokens ranked into the kept set at this stage: min(K_i, n - 1) (the reference's cap)."""
        lists = stage_lists(budget.count(n0))
        stage = self.layers.index(layer) + len(REF_LAYERS) - len(self.layers)  # the last stages when fewer layers
        return max(0, min(lists[stage], n - 1))

    def keep_count(self, budget: Budget, n: int, n0: int, num_layers: int, layer: int | None) -> int:
        if budget.is_identity:
            return n
        kept = self.survivors(budget, n, n0, layer)  # type: ignore[arg-type]
        return kept + (clusters_for(n - kept)[1] if self.recycle else 0)

    def select(self, sig: Signals, k: int) -> torch.Tensor | Selection:
        z, z_mask = sig.instruction  # (S, T, D) input embeddings of the text after the image
        rate = (raters(sig.projected, z, z_mask) if self.raters == "relevance" else z_mask).float()  # (S, T)
        rows = sig.text_attention_rows  # (S, T, N)
        score = check_finite((rows * rate[..., None]).sum(1) / rate.sum(1, keepdim=True).clamp(min=1), owner=self.name)
        S, N = score.shape
        keep, n_clusters = split(N, k) if self.recycle else (k, 0)
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # (S, N)
        kept = order[:, :keep]
        if not n_clusters:
            return kept
        x = sig.tokens  # (S, N, D) hidden states entering the layer
        m, c = clusters_for(N - keep)
        index, values = [], []
        for s in range(S):
            dropped = order[s, keep:]  # descending score: the first m are recycled
            pool = dropped[:m]
            centres, assign = dpc_knn(x[s, pool], c)
            merged = torch.zeros(c, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(
                0, assign, x[s, pool].float()) / (torch.bincount(assign, minlength=c)[:, None] + 1e-6)
            index.append(torch.cat([kept[s], pool[centres]]))
            values.append(torch.cat([x[s, kept[s]], merged.to(x.dtype)]))
        return Selection(torch.stack(index), torch.stack(values))
