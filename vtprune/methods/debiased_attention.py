"""Attention debiasing: remove the positional (recency) trend of an attention score and suppress padding.

Paper: "Attention Debiasing for Token Pruning in Vision Language Models", arXiv:2508.17807. Official code:
intcomp/attention-bias (patches for FastV, SparseVLM, PyramidDrop, HiMAP, TokenCarve).

Text-to-image attention grows with the image token's position (later tokens sit closer to the text), so an
attention-scored pruner keeps the bottom of the image. The trend f(x) of the host's score along the token's
relative position x = i / N is fitted on the model's own attention (``vtprune.calibration``); scores are multiplied by
w(x) = f(0) / f(x) before the top-k, and pad-to-square patches (more than ``pad_threshold`` of the patch is
fill) are ranked last; with ``sink=c``, so are attention-sink tokens (representation norm > c x the span's
median: ViT high-norm artefacts at the vision stage, massive-activation tokens in the LLM).
``trend="exp"`` fits f(x) = exp(a + b x) by least squares on log scores (the paper);
``"poly3"`` a cubic (the form of the file shipped for FastV). The standalone method is FastV plus debiasing;
``host=`` wraps any attention-scored method (``fastv``, ``cls_attention``, ``transition``, ...).

Curves, in order of faithfulness:

* ``vtprune.calibration.debiased_attention(model, batches)``: the trend fitted on the model in use (the
  paper's procedure) -- the faithful path for any model, host and image size.
* ``coef=...``: a curve you have.
* the default (no ``coef``): with the FastV host, the curve the reference ships for FastV
  (``playground/data/weight/FastV/weight.npy``: w_i = 1 / (1 + 1.73675 x - 4.84324 x^2 + 4.90965 x^3) at
  x = i / 576, exact to 1e-15), fitted by its authors on LLaVA-1.5-7B; applied at relative positions, it is
  right only as far as another model's attention trend resembles that one (w falls to 0.36 at the last token).
  Hosts for which the reference ships no curve default to ``trend="none"`` (padding suppression only).

Differences from the reference:
  * Curves are fitted here, per model, on inputs the user gives (``vtprune.calibration``), or default to the
    reference's FastV file; the reference ships per-method, per-benchmark weight files with no fitting
    script (possibly fitted on the test split).
  * x is the token's rank in its span over the span's length, so a curve transfers across image sizes
    (the reference's curves are 576 values, LLaVA-1.5 only).
  * Sink suppression (``sink=``) is not in the reference code (it suppresses padding only); it is off by
    default, so the default reproduces the reference.
  * Padding is detected from the pixels (the mean-colour fill of ``expand2square``) rather than from the
    original size; the reference's FastV also shrinks the budget to the valid patches, vtprune keeps
    exactly the budget (padding patches last).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from vtprune.methods.base import Method, ScoreMethod, build
from vtprune.signals import Signals
from vtprune.registry import METHODS

TRENDS = ("exp", "poly3", "none")
# 1 / w of the reference's FastV weight file as a cubic in x = i / 576 (intcomp/attention-bias @ e75ebe7)
FASTV_SHIPPED = (1.0, 1.73675382, -4.84323564, 4.90965239)


def trend_weights(trend: str, coef: tuple[float, ...] | None, n: int, device: torch.device) -> torch.Tensor:
    """(n,) w(x) = f(0) / f(x) at x = i / n."""
    x = torch.arange(n, device=device, dtype=torch.float64) / n
    if trend == "none" or coef is None:
        return torch.ones(n, device=device)
    if trend == "exp":
        return torch.exp(-coef[0] * x).float()
    f = sum(c * x**p for p, c in enumerate(coef)).clamp(min=1e-6)
    return (f[0] / f).float()


def sink_tokens(x: torch.Tensor, factor: float) -> torch.Tensor:
    """(S, N) bool: candidates whose representation norm exceeds ``factor`` x the span's median norm.

    Attention sinks are norm outliers: the high-norm artefact tokens of ViTs (Darcet et al., "Vision
    Transformers Need Registers", arXiv:2309.16588) and the massive-activation visual tokens of LLMs
    ("See What You Are Told", arXiv:2503.03321). They draw attention whatever the content, so an
    attention score over-ranks them."""
    norm = x.float().norm(dim=-1)  # (S, N)
    return norm > factor * norm.median(dim=-1, keepdim=True).values


def fit_trend(x: torch.Tensor, y: torch.Tensor, trend: str, bins: int = 64) -> tuple[float, ...]:
    """Fit the mean normalised score y at relative positions x in [0, 1): exp -> (b,), poly3 -> (c0..c3)."""
    b = (x * bins).long().clamp(max=bins - 1)
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, y.double())
    counts = torch.bincount(b, minlength=bins).double()
    ok = counts > 0
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    xs, ys = centres[ok], (sums[ok] / counts[ok]).clamp(min=1e-12)
    if trend == "exp":
        A = torch.stack([torch.ones_like(xs), xs], 1)
        sol = torch.linalg.lstsq(A, ys.log()[:, None]).solution[:, 0]
        return (float(sol[1]),)
    A = torch.stack([xs**p for p in range(4)], 1)
    sol = torch.linalg.lstsq(A, ys[:, None]).solution[:, 0]
    return tuple(float(c) for c in sol)


@METHODS.register("debiased_attention")
@dataclass(frozen=True, kw_only=True)
class DebiasedAttention(ScoreMethod):
    """Host attention score x positional de-trending, padding last (standalone: FastV host, layer 2)."""

    name = "debiased_attention"
    stage = "layer"

    host: str = "fastv"
    host_options: dict = field(default_factory=dict)
    trend: str | None = None  # None: from coef (1 value: "exp", 4: "poly3"), else the host's default curve
    coef: tuple[float, ...] | None = None
    pad_threshold: float | None = 0.5
    sink: float | None = None  # rank norm outliers (> sink x the span's median norm) last; None: off
    _host: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hcls = METHODS.get(self.host)
        if not issubclass(hcls, ScoreMethod) or hcls is DebiasedAttention:
            raise ValueError(f"debiased_attention: host {self.host!r} is not an attention-scored method "
                             "(fastv, cls_attention, transition, entropy, ...)")
        opts = dict(self.host_options)
        if self.layer is not None:
            opts["layer"] = self.layer
        host = build(hcls, opts)
        object.__setattr__(self, "_host", host)
        object.__setattr__(self, "layer", host.layer)
        for attr in ("stage", "pre_llm_ok", "layer_ok", "scored_at_previous_layer"):
            object.__setattr__(self, attr, getattr(host, attr))
        if isinstance(self.coef, list):
            object.__setattr__(self, "coef", tuple(self.coef))
        if self.trend is None:  # resolved here, so to_dict / from_dict round-trip the curve actually used
            if self.coef is not None:
                object.__setattr__(self, "trend", "exp" if len(self.coef) == 1 else "poly3")
            elif self.host == "fastv":
                object.__setattr__(self, "trend", "poly3")
                object.__setattr__(self, "coef", FASTV_SHIPPED)
            else:
                object.__setattr__(self, "trend", "none")
        super().__post_init__()

    def validate(self) -> None:
        if self.trend not in TRENDS:
            raise ValueError(f"debiased_attention: trend={self.trend!r}; allowed: {', '.join(map(repr, TRENDS))}")
        if self.trend != "none" and self.coef is None:
            raise ValueError(
                f"debiased_attention: trend={self.trend!r} needs its coefficients: run "
                "vtprune.calibration.debiased_attention(model, batches), pass coef=..., or leave trend unset "
                "(the host's default curve)"
            )
        if self.sink is not None and not self.sink > 1:
            raise ValueError(f"debiased_attention: sink={self.sink!r} must be > 1 (a multiple of the median norm) "
                             "or None")
        if self.coef is not None and len(self.coef) != (1 if self.trend == "exp" else 4):
            raise ValueError(f"debiased_attention: trend {self.trend!r} takes {1 if self.trend == 'exp' else 4} "
                             f"coefficient(s), got {self.coef!r}")

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        extra = {"padding_fraction"} if self.pad_threshold is not None else set()
        if self.sink is not None:
            extra.add("vit_features" if self.stage == "vision" else "tokens")
        return self._host.required_signals(has_cls) | extra

    def resolve(self, num_layers: int) -> Method:
        host = self._host.resolve(num_layers)
        return dataclasses.replace(self, layer=host.layer) if host.layer != self.layer else self

    def transition_layers(self, num_layers: int) -> tuple[int, ...]:
        return self._host.transition_layers(num_layers)

    def keep_count(self, budget, n, n0, num_layers, layer):
        return self._host.keep_count(budget, n, n0, num_layers, layer)

    def score(self, sig: Signals) -> torch.Tensor:
        s = self._host.score(sig).float()  # (S, N)
        return s * trend_weights(self.trend, self.coef, s.shape[-1], s.device)

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        s = self.score(sig)
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # by debiased score
        valid = torch.ones_like(s, dtype=torch.bool)  # (S, N)
        if self.pad_threshold is not None:
            valid &= sig.padding_fraction <= self.pad_threshold
        if self.sink is not None:
            valid &= ~sink_tokens(sig.vit_features if self.stage == "vision" else sig.tokens, self.sink)
        # suppressed tokens last; the stable sort keeps the debiased score order within each group
        last = torch.sort(valid.gather(1, order).int(), dim=-1, descending=True, stable=True).indices
        order = order.gather(1, last)
        return order[:, :k]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_host", None)
        return out
