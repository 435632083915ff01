"""Capture: the hooks that record what signals are computed from, driven by the signal table.

Each signal's row in :data:`vtprune.signals.SIGNAL_TABLE` names its source; the steps' methods say which
signals they read and at which layers, and :func:`capture_points` turns that into the set of (source, layer)
points to hook, one hook each. Captures hold references (no copies) and are computed from only when a method
asks (:mod:`vtprune.engine.view`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from vtprune import compat
from vtprune.adapters.base import Adapter, VisionRecord
from vtprune.engine.state import Call, Step
from vtprune.signals import SIGNAL_TABLE

Point = tuple[str, int]  # (source, layer): a ViT hidden-state index, a decoder layer, or -1 (none)


def capture_points(adapter: Adapter, steps: list[Step]) -> dict[Point, Any]:
    """Where the steps' signals come from. Values: the method's statistic for ``sublayers`` points, else None."""
    points: dict[Point, Any] = {}
    for step in steps:
        m = step.method
        for name in m.required_signals(adapter.has_cls):
            source = SIGNAL_TABLE[name].source
            if source in ("vit_attention", "vit_output"):
                for vl in m.vit_layers_read(adapter.num_vit_layers(), adapter.has_cls):
                    points[(source, adapter.feature_hidden_index(vl))] = None
            elif source in ("projector_input", "pixels"):
                points[(source, -1)] = None
            elif source in ("decoder_attention", "decoder_input") and step.layer is not None:
                points[(source, step.layer - 1)] = None
            elif source == "sublayers":
                for l in m.transition_layers(adapter.num_layers):
                    points[(source, l)] = m.sublayer_statistic
    return points


class Captures:
    """Installs the capture hooks of one handle. ``pending()`` is the feature call running now (vision
    captures go to its record); ``prefilling()`` the forward whose prefill runs now (LLM captures)."""

    def __init__(self, adapter: Adapter, pending: Callable[[], VisionRecord | None],
                 prefilling: Callable[[], Call | None]) -> None:
        self.adapter, self.pending, self.prefilling = adapter, pending, prefilling
        self.needs_pixels = False

    def install(self, patcher: Any, steps: list[Step]) -> None:
        a = self.adapter
        for (source, l), statistic in sorted(capture_points(a, steps).items(), key=lambda kv: kv[0]):
            if source == "vit_attention":
                m = a.vit_attention(l)
                patcher.pre_hook(m, self._vit_in(l), what=f"vtprune: capture ViT attention input {l}",
                                 via_forward=a.bypasses_hooks(m))
            elif source == "vit_output":
                m = a.vit_layers()[l - 1]
                patcher.post_hook(m, self._vit_out(l), what=f"vtprune: capture ViT output {l}",
                                  via_forward=a.bypasses_hooks(m))
            elif source == "projector_input":
                patcher.pre_hook(a.projector, self._projector_in, what="vtprune: capture projector input",
                                 via_forward=a.bypasses_hooks(a.projector))
            elif source == "pixels":
                self.needs_pixels = True  # the feature-call wrapper keeps a reference to the pixels
            elif source == "decoder_attention":
                patcher.pre_hook(a.decoder_layers[l].self_attn, self._attention_in(l),
                                 what=f"vtprune: capture layer {l} attention input")
            elif source == "decoder_input":
                patcher.pre_hook(a.decoder_layers[l], self._layer_in(l), what=f"vtprune: capture layer {l} input")
            elif source == "sublayers":
                for part, module in (("attn", a.mixer(l)), ("mlp", a.decoder_layers[l].mlp)):
                    patcher.post_hook(module, self._sublayer(l, part, statistic),
                                      what=f"vtprune: capture layer {l} {part} input/output")

    # ------------------------------------------------------------------ vision tower (during a feature call)
    def _vit_in(self, h: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            record = self.pending()
            if record is not None:
                record.stash[("vit_in", h)] = self.adapter.vit_attention_inputs(args, kwargs)

        return hook

    def _vit_out(self, h: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            record = self.pending()
            if record is not None:
                record.stash[("vit_out", h)] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def _projector_in(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        record = self.pending()
        if record is not None:
            record.stash["features"] = (args[0] if args else next(iter(kwargs.values()))).detach()

    # ------------------------------------------------------------------ decoder (during a prefill)
    def _attention_in(self, l: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = self.prefilling()
            if call is not None:
                call.fwd.captures[("attn", l)] = {
                    "x": (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach(),
                    "pe": kwargs.get("position_embeddings"), "cache": compat.cache_in(kwargs)}

        return hook

    def _layer_in(self, l: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = self.prefilling()
            if call is not None:
                call.fwd.captures[("hidden", l)] = {"x": (args[0] if args else kwargs["hidden_states"]).detach()}

        return hook

    def _sublayer(self, l: int, part: str, statistic: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., None]:
        """The method's per-token statistic of a sub-layer, reduced at once (no (B, L, D) is kept) and stored in
        LLM-input coordinates."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            call = self.prefilling()
            if call is None:
                return
            fwd = call.fwd
            x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x_out = output[0] if isinstance(output, tuple) else output
            t0 = time.perf_counter()
            m = fwd.map_at(l) or fwd.base_identity()
            with torch.no_grad():
                stats = statistic(x_in, x_out, fwd.attend(m))
                parts = fwd.captures.setdefault(("sublayers", l), {})
                for key, value in stats.items():  # (B, Lc) -> (B, L0)
                    base = torch.zeros_like(fwd.base_mask, dtype=torch.float32)
                    parts[(part, key)] = base.scatter_(1, m.index.clamp(min=0), torch.where(m.valid, value, 0.0))
            call.stats.overhead_ms += (time.perf_counter() - t0) * 1e3

        return hook
