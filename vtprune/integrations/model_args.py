"""lmms-eval ``--model_args``: the pruning part (method, budget, positions, newlines, the method's own fields) split
off and validated before any checkpoint is loaded, the rest left for the model's constructor."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection
from typing import Any

from vtprune import spec
from vtprune.api import NEWLINES, POSITIONS
from vtprune.api import method as build_method
from vtprune.budget import check_policy
from vtprune.methods.base import Method
from vtprune.registry import METHODS

#: model_args that configure pruning rather than the model (a method's own fields come on top).
PRUNE_KEYS: tuple[str, ...] = ("method", "budget", "positions", "newlines")
#: Arguments lmms-eval itself passes to every model constructor.
FRAMEWORK_KEYS: tuple[str, ...] = ("batch_size", "max_batch_size", "device")
_BASELINE_NAMES = {"", "none", "null", "baseline"}
_BUDGET_FIELDS = ("ratio", "keep", "layer")
# Method fields that are objects, not options: filled in from the loaded model where they exist.
_INTERNAL_FIELDS = {"tokenizer"}


# ============================================================================ model_args
@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """One pruning configuration: a validated method object (None = unpruned) and the span policy."""

    method: Method | None = None
    budget: str = "per_frame"
    positions: str = "original"
    newlines: str = "row"

    @property
    def method_label(self) -> str:
        """``"none"``, ``"kcenter"``, or ``"fastv(layer=3)"`` when options differ from the defaults."""
        m = self.method
        if m is None:
            return "none"
        try:
            defaults = type(m)().to_dict()
        except (TypeError, ValueError):
            defaults = {}
        opts = {k: v for k, v in m.to_dict().items()
                if k not in ("method", "version", "ratio", "keep") and defaults.get(k, object()) != v}
        extra = [f"budget={self.budget}"] if self.budget != "per_frame" else []
        extra += [f"positions={self.positions}"] if self.positions != "original" else []
        extra += [f"newlines={self.newlines}"] if self.newlines != "row" else []
        inner = ", ".join([f"{k}={v}" for k, v in opts.items()] + extra)
        return f"{m.name}({inner})" if inner else m.name

    @property
    def budget_label(self) -> str:
        """``"ratio=0.75"``, ``"keep=64"`` or ``"-"`` (unpruned)."""
        m = self.method
        if m is None:
            return "-"
        return f"keep={m.keep}" if m.keep is not None else f"ratio={m.ratio:g}"

    @property
    def label(self) -> str:
        return "baseline" if self.method is None else f"{self.method_label} {self.budget_label}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": None if self.method is None else self.method.to_dict(), "budget": self.budget,
                "positions": self.positions, "newlines": self.newlines}


def method_options(name: str) -> dict[str, str]:
    """The options of method ``name`` settable from model_args: field name -> annotation."""
    return {k: v for k, v in spec.fields(name).items() if k not in _INTERNAL_FIELDS}


def parse_model_args(kwargs: dict[str, Any], *, allowed: Collection[str] | None,
                     owner: str = "vtprune") -> tuple[PruneConfig, dict[str, Any]]:
    """Split model_args into a validated :class:`PruneConfig` and the rest (for the model constructor).

    Args:
        kwargs: the parsed ``--model_args`` (plus lmms-eval's ``batch_size`` / ``device``).
        allowed: argument names the model constructor accepts (None: accept everything).
        owner: the model id, for error messages.

    Raises:
        ValueError: an unknown method (with "did you mean"), an invalid option value, a budget without
            a method or a method without a budget, or arguments neither pruning nor the model knows.
    """
    kw = dict(kwargs)
    name = kw.pop("method", None)
    budget = kw.pop("budget", "per_frame")
    positions = kw.pop("positions", "original")
    newlines = kw.pop("newlines", "row")
    try:
        check_policy(budget)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None
    if positions not in POSITIONS:
        raise ValueError(f"{owner}: positions={positions!r} is not allowed; allowed: {', '.join(POSITIONS)}")
    if newlines not in NEWLINES:
        raise ValueError(f"{owner}: newlines={newlines!r} is not allowed; allowed: {', '.join(NEWLINES)}")

    method_kw: dict[str, Any] = {}
    options: dict[str, str] = {}
    if name is None or str(name).strip().lower() in _BASELINE_NAMES:
        name = None
        stray = [k for k in _BUDGET_FIELDS if k in kw]
        if stray:
            raise ValueError(
                f"{owner}: {', '.join(stray)} given without method=; name a method (one of "
                f"{', '.join(METHODS.names())}) or drop them for the unpruned baseline"
            )
    else:
        try:
            options = method_options(str(name))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{owner}: {exc.args[0] if exc.args else exc}") from None
        for key in [k for k in kw if k in options]:
            try:
                method_kw[key] = spec.coerce(key, kw.pop(key), options[key])
            except ValueError as exc:
                raise ValueError(f"{owner}: {key}: {exc}") from None

    rest: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in kw.items():
        if allowed is None or key in allowed or key in FRAMEWORK_KEYS:
            rest[key] = value
        else:
            unknown.append(key)
    if unknown:
        model_part = sorted(set(allowed or ()) - {"self"})
        parts = [f"model: {', '.join(model_part)}"] if model_part else []
        parts.append(f"pruning: {', '.join(PRUNE_KEYS)}")
        parts.append(f"method {name!r}: {', '.join(options)}" if name else
                     "method options (ratio, keep, layer, ...) once method= is given")
        bad = ", ".join(map(repr, unknown))
        what = "model_args" if model_part else "option(s)"
        raise ValueError(f"{owner}: unknown {what} {bad}; allowed: {'; '.join(parts)}")

    method_obj = None
    if name is not None:
        try:
            method_obj = build_method(str(name), **method_kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{owner}: {exc}") from None
        if method_obj.ratio is None and method_obj.keep is None:
            raise ValueError(
                f"{owner}: method={name!r} needs a budget: ratio=R (fraction of visual tokens removed, "
                "in [0, 1)) or keep=K (visual tokens kept per span)"
            )
    return PruneConfig(method_obj, budget, positions, newlines), rest


def _init_params(cls: type) -> set[str] | None:
    """Named parameters of ``cls.__init__`` (None if it cannot be inspected)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    return {p.name for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
