"""The public API: ``prune(model, method, ratio)`` and the handle that undoes it."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from vtprune import compat
from vtprune.adapters.base import Adapter
from vtprune.engine.hf import Engine
from vtprune.engine.state import Step
from vtprune.budget import POLICIES, Budget, check_keep, check_policy, check_ratio
from vtprune.methods.base import Method, build
from vtprune.patching import Patcher
from vtprune.registry import ADAPTERS, METHODS
from vtprune.signals import SIGNAL_TABLE
from vtprune.types import PruneStats

if TYPE_CHECKING:
    from vtprune.masks import ImageTokens

_HANDLE_ATTR = "_vtprune_handle"
POSITIONS: tuple[str, ...] = ("original", "compact")
NEWLINES: tuple[str, ...] = ("row", "all")
_STAGE_ORDER = {"vision": 0, "input": 1}


class PruneHandle:
    """What :func:`prune` returns. ``remove()`` (or leaving a ``with`` block) restores the model exactly.

    Attributes:
        model: the pruned model.
        steps: the resolved (method, budget, stage) steps, in the order they act.
        adapter: the model-family adapter in use.
    """

    def __init__(self, model: nn.Module, steps: list[Step], adapter: Adapter, positions: str) -> None:
        self.model = model
        self.steps = steps
        self.adapter = adapter
        self.positions = positions
        self._stats: list[PruneStats] = [PruneStats()]
        self._patcher = Patcher()
        self._engine = Engine(adapter, steps, positions, self._stats)

    def _install(self) -> None:
        """Hook the model (through the Patcher: ``remove()`` undoes exactly this)."""
        patcher, model = self._patcher, self.model
        patcher.set_attr(model, _HANDLE_ATTR, self, what="vtprune: handle attribute")
        # copy.deepcopy / pickle look these up on the instance: a pruned model copies as an independent pruned
        # model, and refuses to pickle with a reason instead of failing on a hook closure
        patcher.set_attr(model, "__deepcopy__", self._deepcopy_model, what="vtprune: deepcopy as a pruned model")
        patcher.set_attr(model, "__reduce_ex__", _refuse_pickle, what="vtprune: refuse to pickle hooks")
        try:
            self._engine.install(patcher)
        except BaseException:
            patcher.undo()
            raise

    def _deepcopy_model(self, memo: dict[int, Any]) -> nn.Module:
        """``copy.deepcopy(model)``: copy the unpruned model, then prune the copy with the same steps (its own
        hooks, state and handle: ``vtprune.handle_of(copy)``). The original is unhooked during the copy and
        hooked again after, by this same handle."""
        self._patcher.undo()
        try:
            clone = copy.deepcopy(self.model, memo)
        finally:
            self._install()
        PruneHandle(clone, self.steps, type(self.adapter)(clone), self.positions)._install()
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> PruneHandle:
        """Deep-copying a handle deep-copies its model and returns the copy's handle (removed if this one is)."""
        clone = copy.deepcopy(self.model, memo)
        twin = handle_of(clone)
        return twin if twin is not None else PruneHandle(clone, self.steps, type(self.adapter)(clone), self.positions)

    @property
    def stats(self) -> PruneStats:
        """Statistics of the last prefill: visual tokens before/after per sample, per stage, timings."""
        return self._stats[0]

    def kept_masks(self) -> list[ImageTokens]:
        """Per image / frame of the last prefill, the kept tokens in the image's own patch grid after every stage
        (:func:`vtprune.masks.kept_masks`)."""
        from vtprune.masks import kept_masks

        return kept_masks(self.stats)

    @property
    def methods(self) -> list[Method]:
        return [s.method for s in self.steps]

    @property
    def active(self) -> bool:
        return self.model.__dict__.get(_HANDLE_ATTR) is self

    def remove(self) -> None:
        """Undo every hook and swap, newest first. Idempotent."""
        self._patcher.undo()

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the configuration (for result logs)."""
        from vtprune import __version__

        return {
            "vtprune": __version__,
            "model": self.adapter.family,
            "positions": self.positions,
            "steps": [
                {"stage": s.label, "method": s.method.to_dict(), "newlines": s.newlines,
                 "budget": {"ratio": s.budget.ratio, "keep": s.budget.keep, "policy": s.budget.policy}}
                for s in self.steps
            ],
        }

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        steps = ", ".join(f"{s.method.name}@{s.label} ({s.budget})" for s in self.steps)
        return f"PruneHandle({self.adapter.family}: {steps}; {state})"


def _refuse_pickle(protocol: int = 2) -> Any:
    raise TypeError(
        "a model pruned by vtprune cannot be pickled or shallow-copied: its hooks are closures over this model. "
        "copy.deepcopy(model) gives an independent pruned copy; to save, use save_pretrained() (pruning changes "
        "no weight) and prune again after loading, or call handle.remove() first"
    )


def handle_of(model: nn.Module) -> PruneHandle | None:
    """The active :class:`PruneHandle` of ``model`` (e.g. of a ``copy.deepcopy``), or None if it is not pruned."""
    return model.__dict__.get(_HANDLE_ATTR)


def method(name: str, **kwargs: Any) -> Method:
    """Build a validated method object, e.g. ``vtprune.method("fastv", layer=3, keep=64)``."""
    return build(METHODS.get(name), kwargs)


def list_methods() -> list[str]:
    """Registry keys of every available method (aliases such as "divprune" also work)."""
    return METHODS.names()


def list_models() -> list[dict[str, Any]]:
    """The supported model families: their classes, stages and tested transformers versions."""
    out = []
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        out.append({"family": name, "classes": list(cls.model_classes), "stages": sorted(cls.stages),
                    "transformers": cls.tested_transformers})
    return out


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family (where its parts are, how its visual tokens are laid out); raises for
    unsupported models, listing the supported classes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune() needs a transformers model (nn.Module), got {type(model).__name__}")
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        if cls.matches(model):
            return cls(model)
    supported = [c for n in ADAPTERS.names() for c in ADAPTERS.get(n).model_classes]
    raise ValueError(f"unsupported model {type(model).__name__}; vtprune supports: {', '.join(supported)}")


def _resolve_methods(spec: Any, layer: Any, method_kwargs: dict[str, Any]) -> list[Method]:
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ValueError("prune() needs at least one method")
    if len(specs) > 1 and (layer is not None or method_kwargs):
        raise ValueError(
            "with several methods, pass per-method options through vtprune.method(name, ...) objects, "
            f"not prune(layer=..., **kwargs) (got layer={layer!r}, kwargs={sorted(method_kwargs)})"
        )
    extra = dict(method_kwargs)
    if layer is not None:
        extra["layer"] = tuple(layer) if isinstance(layer, (list, tuple)) else layer
    methods = []
    for m in specs:
        if isinstance(m, str):
            methods.append(build(METHODS.get(m), extra))
        elif isinstance(m, Method):
            if extra:
                allowed = {f.name for f in dataclasses.fields(m)}
                bad = sorted(set(extra) - allowed)
                if bad:
                    raise ValueError(f"method {m.name!r} got unknown argument(s) {bad}; allowed: {sorted(allowed)}")
                m = dataclasses.replace(m, **extra)
            methods.append(m)
        else:
            raise TypeError(f"a method is a registry name or a vtprune.method(...) object, got {type(m).__name__}")
    return methods


def _check_supported(adapter: Adapter, m: Method, positions: str) -> None:
    family, n_layers = adapter.family, adapter.num_layers
    for k in m.layers:
        if k >= n_layers:
            raise ValueError(
                f"method {m.name!r}: layer={k} is out of range; {family} has {n_layers} decoder layers "
                f"(valid: {1 if m.scored_at_previous_layer else 0}..{n_layers - 1})"
            )
    stages = {"layer"} if m.layers and m.layers != (0,) else {m.stage}
    missing_stage = stages - set(adapter.stages)
    if missing_stage:
        raise ValueError(f"{family} adapter cannot prune at the {missing_stage.pop()} stage needed by {m.name!r}")
    required = m.required_signals(adapter.has_cls)
    if any(SIGNAL_TABLE[s].needs_cls for s in required) and not adapter.has_cls:
        raise ValueError(
            f"method {m.name!r} needs a [CLS] token, but {family}'s vision tower "
            f"({adapter.config.vision_config.model_type}) has none"
        )
    missing = sorted(s for s in required if SIGNAL_TABLE[s].source not in adapter.sources)
    if missing:
        raise ValueError(f"method {m.name!r} needs signal(s) {missing} that the {family} adapter cannot supply")
    if required & {"cls_attention", "vit_keys", "received_attention", "vit_cls"}:
        for vl in m.vit_layers_read(adapter.num_vit_layers(), adapter.has_cls):
            adapter.vit_attention(vl)  # raises if a ViT layer is out of range
    if "text_attention" in required and m.layers and min(m.layers) < 1:
        raise ValueError(f"method {m.name!r} scores with layer K-1, so layer must be >= 1")
    if any(SIGNAL_TABLE[s].source == "decoder_attention" for s in required):
        attention = adapter.attention_layers()
        bad = [k for k in m.layers if k >= 1 and k - 1 not in attention]
        if bad:
            ok = sorted(k + 1 for k in attention if k + 1 < n_layers)
            raise ValueError(
                f"method {m.name!r}: layer={bad[0]} scores from decoder layer {bad[0] - 1}, which has no attention "
                f"map ({family}'s layer {bad[0] - 1} is {adapter.layer_type(bad[0] - 1)}); choose a layer right "
                f"after an attention layer: {ok}")
    if m.layers and m.layers != (0,) and not m.layer_ok:
        raise ValueError(f"method {m.name!r} cannot act inside the LLM")


def _expanded(m: Method, num_layers: int) -> list[Method]:
    """The steps ``m`` runs as; a step it adds (VScan's in-LLM drop, ToDRE's) takes ``m``'s own budget when it has
    none, so ``method("vscan", keep=64)`` plans as ``prune(..., "vscan", keep=64)`` does."""
    own = {"ratio": m.ratio, "keep": m.keep} if m.ratio is not None or m.keep is not None else None
    return [sub if sub is m or own is None or sub.ratio is not None or sub.keep is not None
            else dataclasses.replace(sub, **own) for sub in m.expand(num_layers)]


def plan(adapter: Adapter, method: str | Method | Sequence[str | Method], ratio: float | None = None, *,
         keep: int | None = None, layer: int | Sequence[int] | None = None, budget: str = "per_frame",
         positions: str = "original", newlines: str = "row", **method_kwargs: Any) -> list[Step]:
    """The validated steps of a ``prune()`` call on ``adapter``'s family, in the order they run (every host
    plans with this: the Hugging Face host on a model, the vLLM host on a model config)."""
    methods = _resolve_methods(method, layer, method_kwargs)
    if ratio is not None and keep is not None:
        raise ValueError(f"give ratio= or keep=, not both (got ratio={ratio!r}, keep={keep!r})")
    if ratio is not None:
        check_ratio(ratio)
    if keep is not None:
        check_keep(keep)
    check_policy(budget)
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} is not allowed; allowed: {', '.join(map(repr, POSITIONS))}")
    if newlines not in NEWLINES:
        raise ValueError(f"newlines={newlines!r} is not allowed; allowed: {', '.join(map(repr, NEWLINES))}")
    methods = [sub for m in methods for sub in _expanded(m.resolve(adapter.num_layers), adapter.num_layers)]
    steps = []
    for m in methods:
        _check_supported(adapter, m, positions)
        own = m.ratio is not None or m.keep is not None
        r, k = (m.ratio, m.keep) if own else (ratio, keep)
        if r is None and k is None:
            raise ValueError(f"method {m.name!r} has no budget: give prune(..., ratio=...) or keep=...")
        b = Budget(ratio=r, keep=k, policy="per_image" if m.span == "video" else budget)
        if not m.layers:
            steps.append(Step(m, b, m.stage, None, newlines))
        for K in m.layers:  # layer 0's input IS the LLM input: it runs with the pre-LLM steps
            steps.append(Step(m, b, f"layer:{K}", K if K > 0 else None, newlines))
    adapter.check(methods, positions)
    steps.sort(key=lambda s: (1, s.layer) if s.layer is not None else (0, _STAGE_ORDER.get(s.label, 2)))
    return steps


def prune(
    model: nn.Module,
    method: str | Method | Sequence[str | Method],
    ratio: float | None = None,
    *,
    keep: int | None = None,
    layer: int | Sequence[int] | None = None,
    budget: str = "per_frame",
    positions: str = "original",
    newlines: str = "row",
    replace: bool = False,
    **method_kwargs: Any,
) -> PruneHandle:
    """Prune the visual tokens of ``model`` in place; returns a :class:`PruneHandle`.

    Args:
        model: a supported transformers VLM (see :func:`list_models`).
        method: a registry name (see :func:`list_methods`), a ``vtprune.method(...)`` object, or a list of
            them to compose (they act in stage order: vision, input, then increasing layers).
        ratio: fraction of visual tokens REMOVED per span, in [0, 1).
        keep: visual tokens kept per span (exclusive with ``ratio``). A method's own ``ratio``/``keep``
            overrides these; each stage applies its budget to the tokens that reach it.
        layer: for a single method, act at the input of decoder layer K (or several layers).
        budget: "per_frame" (each image and video frame), "per_image" (a video pooled) or "global"
            (all visual tokens of a sample).
        positions: "original" keeps every kept token's position id; "compact" re-indexes them.
        newlines: AnyRes ``image_newline`` tokens (LLaVA-NeXT, OneVision; never candidates, never counted):
            "row" keeps one iff its canvas row keeps a token; "all" keeps every one (the count is then known
            before selection, as the vLLM plugin needs).
        replace: remove an existing vtprune handle on this model first instead of raising.
        **method_kwargs: the method's own options (e.g. ``seed=1`` for "random").
    """
    compat.check_transformers()
    adapter = adapter_for(model)
    impl = adapter.attn_implementation()
    if impl.startswith("flex"):
        raise ValueError(f"attn_implementation={impl!r} is not supported (its BlockMask cannot be cut); use sdpa, "
                         "eager or flash_attention_2")
    steps = plan(adapter, method, ratio, keep=keep, layer=layer, budget=budget, positions=positions,
                 newlines=newlines, **method_kwargs)

    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None:
        if not replace:
            raise RuntimeError(
                "this model is already pruned by vtprune; call handle.remove() first or pass replace=True"
            )
        existing.remove()
    handle = PruneHandle(model, steps, adapter, positions)
    handle._install()
    return handle


__all__ = ["NEWLINES", "POLICIES", "POSITIONS", "PruneHandle", "adapter_for", "handle_of", "list_methods",
           "list_models", "method", "plan", "prune"]
