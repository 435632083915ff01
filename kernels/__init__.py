"""Fused ops for applying and scoring pruning, each with a pure-torch ``*_ref`` twin.

Installed as ``vtprune.kernels`` (the repository keeps it at the top level). One op family per file: the
launcher, the ``*_ref`` twin and the dispatch live in ``<op>.py``, the ``@triton.jit`` kernels in the sibling
``<op>_triton.py``, so that DESIGN's "Triton only when first used" holds (a jit decorator needs Triton at
import time).

Every op takes ``backend="auto" | "torch" | "triton"``: "auto" runs Triton on CUDA tensors when Triton is
installed and torch otherwise; ``$VTPRUNE_BACKEND`` overrides "auto". Importing this package imports no
Triton and decorates no kernel: ``<op>_triton`` modules load on first use (see ``_backend``).

* ``gather_sequence``: keep-index -> hidden (B, L', D), position ids (1-D or M-RoPE) and mask, one launch.
* ``pack_varlen``: the same into flash-attention's packed varlen layout (T, D) + ``cu_seqlens``.
* ``attention_rows``: softmax(q·Kᵀ) of a few query rows, GQA-aware, head-mean or per head, no L × L map.
* ``greedy_kcenter`` / ``greedy_mmr`` / ``greedy_coverage``: DivPrune / IDPruner / MMTok selection, one
  fused launch per pick.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path ('' when Python starts there,
    # ``python -m pytest``) and this folder shadows the PyPI package of that name, which transformers >= 5.25
    # imports. Load that package in our place; without one, leave an empty namespace module (what Python makes
    # of a folder without __init__.py, and what transformers reads as "not installed"). The import system
    # returns whatever sys.modules holds once this file has run.
    import importlib.machinery
    import importlib.util
    import os
    import types

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
    else:
        _module = types.ModuleType("kernels")
        _module.__file__, _module.__path__ = None, []
        sys.modules["kernels"] = _module

# The body below only defines names: the ops load on first attribute access, so the shadow guard above can
# hand over before any relative import runs.
_EXPORTS = {
    "resolve_backend": "_backend",
    "triton_available": "_backend",
    "attention_rows": "attention_rows",
    "attention_rows_ref": "attention_rows",
    "GatherOutput": "gather",
    "VarlenOutput": "gather",
    "gather_sequence": "gather",
    "gather_sequence_ref": "gather",
    "pack_varlen": "gather",
    "pack_varlen_ref": "gather",
    "greedy_coverage": "greedy",
    "greedy_coverage_ref": "greedy",
    "greedy_kcenter": "greedy",
    "greedy_kcenter_ref": "greedy",
    "greedy_mmr": "greedy",
    "greedy_mmr_ref": "greedy",
}

if TYPE_CHECKING:
    from ._backend import resolve_backend, triton_available
    from .attention_rows import attention_rows, attention_rows_ref
    from .gather import GatherOutput, VarlenOutput, gather_sequence, gather_sequence_ref, pack_varlen, pack_varlen_ref
    from .greedy import (
        greedy_coverage,
        greedy_coverage_ref,
        greedy_kcenter,
        greedy_kcenter_ref,
        greedy_mmr,
        greedy_mmr_ref,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
