"""Base classes of every pruner.

A method is a frozen, validated dataclass: its fields are its hyper-parameters (with the official
defaults), its class variables say where it can act and which signals it reads. ``select`` maps
:class:`~vtprune.signals.Signals` of S spans to the kept candidate indices; it never touches a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vtprune.budget import Budget, check_keep, check_ratio
from vtprune.signals import Signals
from vtprune.types import SIGNALS, STAGES

LayerSpec = int | tuple[int, ...] | None


@dataclass
class Selection:
    """What :meth:`Method.select` may return instead of a bare index tensor: the kept candidates and,
    for merging methods, the representation each kept token carries on (at the method's stage)."""

    index: torch.Tensor  # (S, k) candidate indices
    values: torch.Tensor | None = None  # (S, k, D) replacement token representations, or None
    drop: torch.Tensor | None = None  # (S,) bool: drop these spans entirely (gates only)


@dataclass(frozen=True, kw_only=True)
class Method:
    """A visual-token pruner.

    Common fields (every method has them):
        ratio: fraction of visual tokens removed at this method's stage; overrides ``prune(ratio=)``.
        keep: absolute tokens kept per span at this method's stage; overrides ``prune(keep=)``.
        layer: None to act before the LLM (at the method's natural stage); K to act at the input of
            decoder layer K during prefill; a tuple of layers for a progressive schedule (the budget
            applies at each layer to the tokens that reach it).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "input"  # the natural stage when ``layer`` is None
    layer_ok: ClassVar[bool] = True  # may act at a decoder layer
    pre_llm_ok: ClassVar[bool] = True  # may act before the LLM
    requires: ClassVar[frozenset[str]] = frozenset()
    scored_at_previous_layer: ClassVar[bool] = False  # reads layer K-1, so K >= 1
    gate: ClassVar[bool] = False  # select() runs even when the budget keeps everything (may drop spans)
    version: ClassVar[int] = 1
    # layer=None on an in-LLM method: this schedule for a 32-layer LLM, scaled to the model's depth by resolve()
    # (validated as given here)
    reference_layers: ClassVar[tuple[int, ...]] = ()
    # "video": a whole video is one span whatever ``budget=`` says (the method compares a video's frames) and keeps
    # video_count() tokens; every image stays a span of its own (one frame)
    span: ClassVar[str | None] = None

    ratio: float | None = None
    keep: int | None = None
    layer: LayerSpec = None

    def __post_init__(self) -> None:
        owner = f"method {self.name!r}"
        if self.ratio is not None and self.keep is not None:
            raise ValueError(f"{owner}: give ratio= or keep=, not both (got ratio={self.ratio}, keep={self.keep})")
        if self.ratio is not None:
            check_ratio(self.ratio, owner=owner)
        if self.keep is not None:
            check_keep(self.keep, owner=owner)
        layers = self.layers if self.layer is not None else self.reference_layers
        if isinstance(self.layer, list):  # from JSON
            object.__setattr__(self, "layer", tuple(self.layer))
        for k in layers:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"{owner}: layer must be a decoder-layer index >= 0, got {self.layer!r}")
            if self.scored_at_previous_layer and k < 1:
                raise ValueError(f"{owner}: layer={k} is invalid; it scores with layer K-1, so layer must be >= 1")
        if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
            raise ValueError(f"{owner}: layers must be strictly increasing, got {self.layer!r}")
        if layers and not self.layer_ok:
            raise ValueError(f"{owner} cannot act inside the LLM (layer={self.layer!r}); "
                             f"it acts at the {self.stage} stage")
        if not layers and not self.pre_llm_ok:
            raise ValueError(f"{owner} acts inside the LLM: give layer=K")
        unknown = set(self.requires) - set(SIGNALS)
        assert not unknown, f"{type(self).__name__}.requires names unknown signals {unknown}"
        assert self.stage in STAGES
        self.validate()

    # --------------------------------------------------------------- subclass API
    def required_signals(self, has_cls: bool) -> frozenset[str]:
        """The signals this configuration reads on a tower with / without [CLS] (default: ``requires``)."""
        return self.requires

    def vit_layers_read(self, vit_depth: int, has_cls: bool) -> tuple[int | None, ...]:
        """The ViT layers (hidden-states indices; None = the feature layer) whose attention / output signals this
        configuration reads on a ``vit_depth``-layer tower: what the hosts capture. Default: ``vit_layer``."""
        return (getattr(self, "vit_layer", None),)

    def transition_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose sub-layers the ``transition`` signal accumulates :meth:`sublayer_statistic` over."""
        return ()

    @staticmethod
    def sublayer_statistic(x_in: torch.Tensor, x_out: torch.Tensor, attend: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token statistics (name -> (B, L)) of one sub-layer of a ``transition_layers`` layer, from its normed
        input x_in (B, L, D), its output before the residual add x_out (B, L, D) and the row's real tokens
        attend (B, L); the ``transition(name)`` signal sums them over those layers below the step's layer."""
        raise NotImplementedError

    def resolve(self, num_layers: int) -> Method:
        """This method with model-dependent defaults filled in: ``layer=None`` becomes ``reference_layers`` scaled
        to the depth (stages landing on one layer merge)."""
        if self.layer is not None or not self.reference_layers:
            return self
        return dataclasses.replace(self, layer=tuple(sorted(set(scale_layers(self.reference_layers, num_layers)))))

    def expand(self, num_layers: int) -> list[Method]:
        """The methods this one runs as (a second stage, e.g. ToDRE's in-LLM drop, is a separate step)."""
        return [self]

    def keep_count(self, budget: Budget, n: int, n0: int, num_layers: int, layer: int | None) -> int:
        """Tokens a span keeps at this method's stage (``layer``: the decoder layer, None before the LLM):
        ``n`` candidates now, ``n0`` in the prompt. The default is the budget's count of ``n``; methods
        whose papers count differently (average budgets, schedules, pivots) override it."""
        return budget.count(n)

    def video_count(self, budget: Budget, n: int, frames: int) -> int:
        """Tokens a video span of ``n`` candidates in ``frames`` frames keeps, for ``span="video"`` methods (whose
        reference counts a whole video its own way). Default: the budget's count."""
        return budget.count(n)

    def validate(self) -> None:
        """Check method-specific fields; raise ValueError naming the bad value."""

    def select(self, sig: Signals, k: int) -> torch.Tensor | Selection:
        """Return (S, k) indices of the kept candidates of each span (any order, no duplicates), or a
        :class:`Selection` that also carries merged representations."""
        raise NotImplementedError

    # --------------------------------------------------------------- plumbing
    @property
    def layers(self) -> tuple[int, ...]:
        if self.layer is None:
            return ()
        return tuple(self.layer) if isinstance(self.layer, (tuple, list)) else (self.layer,)

    def stage_labels(self) -> list[str]:
        return [f"layer:{k}" for k in self.layers] or [self.stage]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, e.g. ``{"method": "fastv", "version": 1, "layer": 2, ...}``."""
        out: dict[str, Any] = {"method": self.name, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Method:
        from vtprune.registry import METHODS

        data = dict(data)
        name = data.pop("method", cls.name or None)
        version = data.pop("version", None)
        target = METHODS.get(name) if cls is Method else cls
        if version is not None and version > target.version:
            raise ValueError(f"{name!r} was saved by a newer vtprune (version {version} > {target.version})")
        return build(target, data)

    def __str__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k not in ("method", "version"))
        return f"{self.name}({fields})"


def scale_layers(layers: tuple[int, ...], num_layers: int, ref_depth: int = 32) -> list[int]:
    """Decoder layers given for a ``ref_depth``-layer LLM, scaled to ``num_layers`` (rounded, within 1..L-1)."""
    return [min(num_layers - 1, max(1, int(p * num_layers / ref_depth + 0.5))) for p in layers]


def build(cls: type[Method], kwargs: dict[str, Any]) -> Method:
    """``cls(**kwargs)`` with an error naming the unknown argument and the allowed ones."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(
            f"method {cls.name!r} got unknown argument(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class ScoreMethod(Method):
    """Keeps the k highest-scoring candidates; subclasses define :meth:`score`."""

    def score(self, sig: Signals) -> torch.Tensor:
        """(S, N) scores, higher = keep."""
        raise NotImplementedError

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return topk_stable(self.score(sig), k, owner=self.name)


def check_finite(scores: torch.Tensor, *, owner: str = "", what: str = "score") -> torch.Tensor:
    """``scores`` unchanged if every value is finite; else a FloatingPointError (a selection from NaN / inf is
    arbitrary). Signals are checked as they are read (:class:`~vtprune.signals.Signals`); methods call this on
    scores they derive, so NaN born inside a method (overflow, 0 / 0) is refused too."""
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).sum().item()
        raise FloatingPointError(f"method {owner!r} produced {bad} non-finite {what}(s); refusing to select")
    return scores


def topk_stable(scores: torch.Tensor, k: int, *, owner: str = "") -> torch.Tensor:
    """Indices of the k largest scores per row; ties go to the earlier token, so the choice does not
    depend on the batch a row is in. Non-finite scores raise instead of selecting arbitrarily."""
    check_finite(scores, owner=owner)
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices  # (S, N)
    return order[..., :k]
