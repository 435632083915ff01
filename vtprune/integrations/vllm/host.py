"""The vLLM host: the pre-LLM steps on the images of one encoder call, through the same selection core and
signal source as the Hugging Face host.

vLLM encodes the images of a step's requests in one ``embed_multimodal`` call (mixed sizes, no prompt text);
the host lays them out as a batch with one row per image (each image is a span of its own; a video's frames
are spans of its row), captures the ViT signals its steps read with the family's hooks, runs
:func:`vtprune.engine.steps.run_pre_llm` and returns each image's kept rows, in prompt order, with the original
index of each kept token (its position in the unpruned image).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vtprune.adapters.base import VisionRecord
from vtprune.engine.capture import Captures
from vtprune.engine.layout import build_layout
from vtprune.engine.state import Forward, IndexMap
from vtprune.engine.steps import run_pre_llm
from vtprune.integrations.vllm.config import Plan
from vtprune.patching import Patcher
from vtprune.types import PruneStats


class VllmHost:
    """Installed on one vLLM model (in each worker) when the plugin is configured."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.adapter = plan.adapter
        self.patcher = Patcher()
        self._pending: VisionRecord | None = None
        self.captures = Captures(self.adapter, lambda: self._pending, lambda: None)
        self.captures.install(self.patcher, plan.steps)
        self.last_stats: PruneStats | None = None  # of the last encoder call (tests and benchmarks read it)
        self.record = plan.config.record if _tp_rank() == 0 else None  # JSON lines, one per encoded image

    def remove(self) -> None:
        self.patcher.undo()

    def encode(self, record: VisionRecord, run: Callable[[], Sequence[torch.Tensor] | torch.Tensor],
               pixels: Any = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the model's own encoder path (``run``: per-image features (n_i, D)) with the captures on, then
        the steps. Returns, per image, (kept features (k_i, D), original index of each kept token (k_i,))."""
        if self.captures.needs_pixels:
            record.stash["pixels"] = pixels
        self._pending = record
        try:
            feats = run()
        finally:
            self._pending = None
        feats = list(feats.unbind(0)) if torch.is_tensor(feats) else list(feats)
        out = self.select(record, feats)
        if self.record:
            share = self.last_stats.overhead_ms / max(len(out), 1)  # the call's selection time, per image
            with open(self.record, "a") as f:
                for c, im, (_, idx) in zip(_checksums(pixels, len(out)), record.images, out):
                    f.write(json.dumps({"checksum": c, "modality": record.modality, "tokens": im.num_tokens,
                                        "kept": idx.tolist(), "select_ms": round(share, 3)}) + "\n")
        return out

    def select(self, record: VisionRecord, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t0 = time.perf_counter()
        sizes = [int(f.shape[0]) for f in feats]
        if sizes != [im.num_tokens for im in record.images]:
            raise RuntimeError(f"vtprune: the encoder returned {sizes} tokens per image, the layout expects "
                               f"{[im.num_tokens for im in record.images]}")
        B, L, dev = len(feats), max(sizes), feats[0].device
        w = self.adapter.signal_width() or feats[0].shape[-1]
        x = feats[0].new_zeros(B, L, w)  # (B, L, D): one row per image
        valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
        for b, f in enumerate(feats):
            x[b, : f.shape[0]] = f[:, :w]
            valid[b, : f.shape[0]] = True
        with torch.no_grad():
            layout, used = build_layout(self.adapter, {record.modality: valid}, {record.modality: record})
            ident = torch.arange(L, device=dev).expand(B, L)
            fwd = Forward(layout=layout, records=used, embeds=x, projected=x, mask0=valid.long(), input_ids=None,
                          base=IndexMap(ident, torch.ones(B, L, dtype=torch.bool, device=dev)))
            stats = PruneStats(visual_before=sizes)
            cur = run_pre_llm(self.adapter, self.plan.steps, fwd, stats)
            out = []
            for b in range(B):
                idx = cur.index[b][cur.valid[b]]
                idx = idx[valid[b, idx]]  # (k,) kept original slots, ascending (the padding we added is dropped)
                rest = feats[b][idx, w:]  # (k, D_extra): columns that travel with their token (DeepStack)
                out.append((torch.cat([fwd.embeds[b, idx], rest], -1) if rest.shape[-1] else fwd.embeds[b, idx], idx))
        stats.visual_after = [int(i.numel()) for _, i in out]
        stats.overhead_ms = (time.perf_counter() - t0) * 1e3
        self.last_stats = stats
        return out


def _checksums(pixels: Any, n: int) -> list[float]:
    """A float64 sum of each image's pixels (NaN when unknown): which image a kept set belongs to."""
    if torch.is_tensor(pixels) and pixels.shape[0] == n:
        return pixels.double().flatten(1).sum(1).tolist()
    if isinstance(pixels, (list, tuple)) and len(pixels) == n:
        return [float(p.double().sum()) for p in pixels]
    return [float("nan")] * n


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (ImportError, AssertionError, RuntimeError):
        return 0
