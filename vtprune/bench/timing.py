"""Honest timing: warm-up, interleaved repetitions, median with min/max, CUDA synchronised."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from torch import nn

from vtprune.bench.clocks import sync
from vtprune.compat import cache_in


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} ms [{self.min_ms:.1f}-{self.max_ms:.1f}]"


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
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: Timing(statistics.median(v), min(v), max(v), len(v)) for name, v in samples.items()}


class PrefillClock:
    """Wall time of every prefill a model runs under ``generate()``, vision encoding included.

    transformers 5.x ``generate()`` encodes images and videos (``get_image_features``) *before* its first
    forward call, so a clock on the model's forward alone misses the vision tower and every vision-stage
    selection. This clock starts at whichever comes first, the vision tower's forward or a prefill forward
    (an empty KV cache), and stops when that prefill forward returns; decode steps are not timed.

    ``on_start()`` runs when a clock starts (its result is handed back); ``on_stop(ms, kwargs, started)``
    receives the elapsed ms, the prefill forward's keyword arguments and what ``on_start`` returned.
    ``ms`` holds the last prefill's time. Remove the hooks with :meth:`remove`.
    """

    def __init__(self, model: nn.Module, on_start: Callable[[], Any] | None = None,
                 on_stop: Callable[[float, dict, Any], None] | None = None) -> None:
        self._on_start, self._on_stop = on_start, on_stop
        self._t0: float | None = None
        self._started: Any = None
        self.ms = float("nan")
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]
        vision = vision_tower(model)
        if vision is not None:
            self._handles.append(vision.register_forward_pre_hook(lambda *_: self._start(), prepend=True))

    def _start(self) -> None:
        if self._t0 is None:
            sync()
            self._t0 = time.perf_counter()
            self._started = self._on_start() if self._on_start is not None else None

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        past = cache_in(kwargs)  # a transformers 5 Cache (the engine tells prefill apart alike)
        if past is not None and past.get_seq_length() > 0:
            self._t0 = None  # a decode step: nothing to time
        else:
            self._start()

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._t0 is None:
            return
        sync()
        self.ms = (time.perf_counter() - self._t0) * 1e3
        started, self._t0, self._started = self._started, None, None
        if self._on_stop is not None:
            self._on_stop(self.ms, kwargs, started)

    def reset(self) -> None:
        self._t0, self._started, self.ms = None, None, float("nan")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a model vtprune supports (None for any other model)."""
    from vtprune.api import adapter_for

    try:
        return adapter_for(model).vision_tower
    except (TypeError, ValueError, AttributeError):
        return None
