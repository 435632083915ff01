"""Honest timing: warm-up, interleaved repetitions, median with min/max, CUDA synchronised."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} ms [{self.min_ms:.1f}-{self.max_ms:.1f}]"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1,
                     progress: bool = False,
                     contexts: dict[str, Callable[[], AbstractContextManager]] | None = None) -> dict[str, Timing]:
    """Time every callable ``reps`` times, interleaved (A B C A B C ...) so drift on a shared machine hits
    all of them alike; returns median / min / max per name. ``contexts[name]()`` is entered around each
    call of ``fns[name]`` but outside the timed region (e.g. installing a pruner)."""
    contexts = contexts or {}

    def ctx(name: str) -> AbstractContextManager:
        return contexts[name]() if name in contexts else nullcontext()

    for _ in range(warmup):
        for name, fn in fns.items():
            with ctx(name):
                fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds = range(reps)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="timing", leave=False)
    for _ in rounds:
        for name, fn in fns.items():
            with ctx(name):
                _sync()
                t0 = time.perf_counter()
                fn()
                _sync()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: Timing(statistics.median(v), min(v), max(v), len(v)) for name, v in samples.items()}
