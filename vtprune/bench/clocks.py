"""Clocks for ``vtprune bench``: per-layer forward timing and peak memory of a block."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def rss_peak() -> Any:
    """Peak resident memory above the starting point while the block runs (MB); CUDA: allocator peak."""
    box = {"peak": 0.0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield box
        box["peak"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            box["peak"] = max(box["peak"], (proc.memory_info().rss - start) / 2**20)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()


class LayerClock:
    """Forward hooks that time every decoder layer, ViT layer and the LM head (CUDA-synchronised)."""

    def __init__(self, model: torch.nn.Module, adapter: Any) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self._handles = []
        parts = [(f"llm.{i}", m) for i, m in enumerate(adapter.decoder_layers)]
        parts += [(f"vit.{i}", m) for i, m in enumerate(adapter.vit_layers())]
        head = model.get_output_embeddings()
        if head is not None:
            parts.append(("head", head))
        for name, module in parts:
            self._handles.append(module.register_forward_pre_hook(self._start(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._stop(name), with_kwargs=True))
        self._t0: dict[str, float] = {}

    def _start(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            sync()
            self._t0[name] = time.perf_counter()
        return hook

    def _stop(self, name: str) -> Callable:
        def hook(module, args, kwargs, out):
            sync()
            self.times[name].append((time.perf_counter() - self._t0[name]) * 1e3)
            y = out[0] if isinstance(out, tuple) else out
            self.tokens[name].append(int(y.shape[-2]) if y.dim() >= 2 else 1)  # what the layer processed
        return hook

    def reset(self) -> None:
        self.times.clear()
        self.tokens.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
