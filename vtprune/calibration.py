"""Calibration: the steps that run a model to fit a method's setting to it. Methods never touch models; these
functions do, through the Patcher and the public adapter lookup, and leave the model as they found it.

* :func:`debiased_attention`: fit Attention Debiasing's positional trend of a host score on the model in use
  (the paper's procedure; without it the method uses the reference's FastV curve).
* :func:`entropy_profile`: EntropyPrune's entropy-collapse layer of a model (``vtprune calibrate-entropy``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vtprune.api import adapter_for, prune
from vtprune.methods.base import Method
from vtprune.methods.debiased_attention import DebiasedAttention, fit_trend
from vtprune.methods.entropy import collapse_layer, global_matrix_entropy, matrix_entropy
from vtprune.patching import Patcher
from vtprune.signals import Signals


# ------------------------------------------------------------------------------------------- attention debiasing
@dataclass(frozen=True, kw_only=True)
class _Recorder(Method):
    """A gate that keeps every token and records the host's normalised scores by relative position."""

    name: ClassVar[str] = "debias_recorder"
    gate: ClassVar[bool] = True
    host_method: Any = None
    points: list = field(default_factory=list, compare=False)

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        return self.host_method.required_signals(has_cls)

    def keep_count(self, budget, n, n0, num_layers, layer):
        return n  # records, never prunes

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        s = self.host_method.score(sig).float()  # (S, N)
        s = s / s.sum(-1, keepdim=True).clamp(min=1e-12)  # per span, so long and short prompts weigh alike
        n = s.shape[-1]
        self.points.append(((torch.arange(n) / n).expand(s.shape[0], n).reshape(-1), s.cpu().reshape(-1)))
        return torch.arange(k, device=sig.device).expand(sig.num_spans, k)


def debiased_attention(model: torch.nn.Module, batches: Iterable[dict[str, Any]], host: str = "fastv",
                       trend: str = "exp", host_options: dict | None = None, **kwargs: Any) -> DebiasedAttention:
    """Fit the positional trend of ``host``'s scores on ``model`` over the given input batches (dicts of model
    inputs) and return the ready ``debiased_attention`` method (``kwargs``: its other options)."""
    base = DebiasedAttention(host=host, host_options=dict(host_options or {}), trend="none", coef=None, **kwargs)
    recorder = _Recorder(host_method=base._host, layer=base.layer)
    for attr in ("stage", "layer_ok", "pre_llm_ok"):
        object.__setattr__(recorder, attr, getattr(base, attr))
    with prune(model, recorder, ratio=0.5), torch.no_grad():  # a gate keeping every token: the model runs unpruned
        for batch in batches:
            model(**batch)
    if not recorder.points:
        raise ValueError("calibration.debiased_attention: no visual tokens were seen in the given batches")
    x = torch.cat([p[0] for p in recorder.points])
    y = torch.cat([p[1] for p in recorder.points])
    coef = None if trend == "none" else fit_trend(x, y, trend)
    return dataclasses.replace(base, trend=trend, coef=coef)


# ------------------------------------------------------------------------------------------- entropy collapse
@torch.no_grad()
def entropy_profile(model: torch.nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per decoder layer, the matrix entropy of the visual tokens' input representations (global, averaged over
    samples) and the mean per-token query entropy EntropyPrune scores with; and the suggested layer (the input
    of the layer after the largest one-step drop). Reads hidden states only (no attention maps)."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers
    token_ids = [adapter.token_id(m) for m in adapter.modalities]
    caps: dict[int, dict] = {}

    def grab(l: int):
        def hook(module, args, kwargs):
            caps[l] = {"x": kwargs["hidden_states"], "pe": kwargs["position_embeddings"]}
        return hook

    patcher = Patcher()
    for l, layer in enumerate(layers):
        if l in adapter.attention_layers():
            patcher.pre_hook(layer.self_attn, grab(l), what=f"calibration: layer {l} attention input")
    global_curve = torch.zeros(len(layers) + 1, dtype=torch.float64)
    token_curve = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    try:
        for batch in batches:
            out = model(**batch, output_hidden_states=True)
            visual = torch.isin(batch["input_ids"], torch.tensor(token_ids, device=batch["input_ids"].device))
            for b in range(visual.shape[0]):
                if not bool(visual[b].any()):
                    continue
                n += 1
                for l, h in enumerate(out.hidden_states):
                    global_curve[l] += global_matrix_entropy(h[b][visual[b]])
                for l, cap in caps.items():
                    attn = layers[l].self_attn
                    x = cap["x"][b : b + 1][:, visual[b]]
                    cos, sin = (t.expand(visual.shape[0], *t.shape[1:])[b : b + 1][:, visual[b]] for t in cap["pe"])
                    q = adapter.decoder_qk(attn, x, cos, sin, key=False).transpose(1, 2)  # (1, N, H, d) post-RoPE
                    token_curve[l] += float(matrix_entropy(q).mean())
    finally:
        patcher.undo()
    if n == 0:
        raise ValueError("entropy_profile: no visual tokens in the given batches")
    curve = (global_curve[: len(layers)] / n).tolist()  # entropy of the input of every decoder layer
    return {"samples": n, "global": curve, "per_token": (token_curve / n).tolist(), "layer": collapse_layer(curve)}
