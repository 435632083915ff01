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

from ._backend import resolve_backend, triton_available
from .attention_rows import attention_rows, attention_rows_ref
from .gather import (
    GatherOutput,
    VarlenOutput,
    gather_sequence,
    gather_sequence_ref,
    pack_varlen,
    pack_varlen_ref,
)
from .greedy import (
    greedy_coverage,
    greedy_coverage_ref,
    greedy_kcenter,
    greedy_kcenter_ref,
    greedy_mmr,
    greedy_mmr_ref,
)

__all__ = [
    "GatherOutput",
    "VarlenOutput",
    "attention_rows",
    "attention_rows_ref",
    "gather_sequence",
    "gather_sequence_ref",
    "greedy_coverage",
    "greedy_coverage_ref",
    "greedy_kcenter",
    "greedy_kcenter_ref",
    "greedy_mmr",
    "greedy_mmr_ref",
    "pack_varlen",
    "pack_varlen_ref",
    "resolve_backend",
    "triton_available",
]
