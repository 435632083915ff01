"""Backend dispatch shared by every op: ``"auto" | "torch" | "triton"``.

Triton is never imported here at module import time; :func:`load_triton_module` imports the module
holding an op's ``@triton.jit`` code the first time the Triton backend is asked for. That keeps
``import vtprune.kernels`` free of Triton (it may not be installed) and, just as important, free of kernel
decoration: Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated*, so decorating at import time
would freeze the compiled/interpreted choice before a test's conftest could set the variable.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Literal

import torch

Backend = Literal["torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "VTPRUNE_BACKEND"


def triton_available() -> bool:
    """True if ``import triton`` succeeds (cheap after the first import: it is then in ``sys.modules``)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True if Triton kernels decorated now would run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """Pick the implementation for tensors on ``device``.

    ``"auto"`` defers to ``$VTPRUNE_BACKEND`` if set, else picks Triton on CUDA when Triton imports, torch
    otherwise.
    Asking for Triton explicitly raises ``ImportError`` if it is missing, and ``RuntimeError`` for CPU tensors
    unless the interpreter is on (``TRITON_INTERPRET=1``, which is how the CPU tests run the kernels).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"${ENV_VAR}={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ImportError(
                "backend='triton' needs the `triton` package (pip install 'vtprune[kernels]'); "
                "use backend='torch' or unset $VTPRUNE_BACKEND"
            )
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' got tensors on {device.type!r}: Triton kernels run on CUDA, or on CPU "
                "only under the interpreter (set TRITON_INTERPRET=1 before the first kernel is used)"
            )
    return backend  # type: ignore[return-value]


def check_launchable(device: torch.device, decorated_interpreted: bool) -> None:
    """Raise if kernels decorated in one mode meet tensors of the other (CPU needs interpreted kernels).

    ``TRITON_INTERPRET`` counts when a kernel is decorated: flipping it after the first use has no effect.
    """
    if device.type != "cuda" and not decorated_interpreted:
        raise RuntimeError(
            "vtprune's Triton kernels were compiled for CUDA (TRITON_INTERPRET was unset when they were "
            f"first used) and cannot run on {device.type!r} tensors; set TRITON_INTERPRET=1 before first use"
        )


def load_triton_module(name: str) -> ModuleType:
    """Import ``vtprune.kernels.<name>`` (an op's Triton half), decorating its kernels on first use."""
    return importlib.import_module(f"{__package__}.{name}")


@contextlib.contextmanager
def device_context(device: torch.device) -> Iterator[None]:
    """Launch on ``device``'s GPU (not the current one) on multi-GPU hosts; a no-op on CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1): ``tl.arange`` extents must be powers of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def block(n: int, *, lo: int = 1, hi: int) -> int:
    """A power-of-two block size covering ``n`` clamped to [lo, hi]."""
    return max(lo, min(hi, next_pow2(n)))
