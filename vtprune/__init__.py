"""vtprune: training-free visual-token pruning for Hugging Face VLMs, in one reversible line.

    import vtprune
    handle = vtprune.prune(model, "kcenter", ratio=0.889)   # 64 of 576 visual tokens reach the LLM
    model.generate(**inputs)
    handle.remove()                                         # restored bit-for-bit

Importing vtprune patches nothing and imports no method or adapter code (the names below load lazily).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "prune": "vtprune.api",
    "PruneHandle": "vtprune.api",
    "handle_of": "vtprune.api",
    "adapter_for": "vtprune.api",
    "method": "vtprune.api",
    "list_methods": "vtprune.api",
    "list_models": "vtprune.api",
    "Method": "vtprune.methods.base",
    "ScoreMethod": "vtprune.methods.base",
    "Selection": "vtprune.methods.base",
    "Signals": "vtprune.signals",
    "Budget": "vtprune.budget",
    "PruneStats": "vtprune.types",
    "kept_masks": "vtprune.masks",
    "ImageTokens": "vtprune.masks",
    "TokenGrid": "vtprune.masks",
    "METHODS": "vtprune.registry",
    "ADAPTERS": "vtprune.registry",
}

if TYPE_CHECKING:
    from vtprune.api import PruneHandle, adapter_for, handle_of, list_methods, list_models, method, prune
    from vtprune.budget import Budget
    from vtprune.masks import ImageTokens, TokenGrid, kept_masks
    from vtprune.methods.base import Method, ScoreMethod, Selection
    from vtprune.registry import ADAPTERS, METHODS
    from vtprune.signals import Signals
    from vtprune.types import PruneStats


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vtprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
