"""Typed, lazily computed inputs of one selection call.

A method sees S spans (images, frames or samples, by the budget policy) of N candidate tokens each and
asks for the signals it needs; each is computed on first access (and shared by every span group of the
same forward), so a method that reads only ``tokens`` costs only a gather. Outside a model, build one
with :meth:`Signals.from_tensors` to run any method on plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch

#: What a host captures so that a signal can be computed (one hook per source and layer):
SOURCES: dict[str, str] = {
    "sequence": "the LLM input or the hidden states at the method's stage (nothing extra to capture)",
    "vit_attention": "the input of the attention of a ViT layer (the method's ``vit_layer``)",
    "vit_output": "the output of a ViT layer",
    "projector_input": "the input of the projector (the vision features)",
    "pixels": "the pixel values of the feature call",
    "decoder_attention": "the input of the attention of decoder layer K-1 (layer stage)",
    "decoder_input": "the input of decoder layer K-1 (layer stage)",
    "sublayers": "inputs and outputs of the attention and MLP of the method's accumulation layers",
}


@dataclass(frozen=True)
class SignalSpec:
    """Where a signal comes from: the capture ``source`` a host installs for it, and whether only vision towers
    with a [CLS] token have it. The code computing it is the host's ``_sig_<name>`` (engine/view.py)."""

    doc: str
    source: str = "sequence"
    needs_cls: bool = False


#: Every signal a method may read (``Method.requires``): adding one means a row here, its accessor below and
#: its computation in the host.
SIGNAL_TABLE: dict[str, SignalSpec] = {
    "tokens": SignalSpec("the sequence representation where the method acts: LLM input embeddings or layer-K input"),
    "projected": SignalSpec("projector output (the LLM input embedding) of each candidate"),
    "vit_features": SignalSpec("pre-projector vision features of each candidate", "projector_input"),
    "vit_keys": SignalSpec("keys of a ViT attention layer at each candidate's patch", "vit_attention"),
    "cls_attention": SignalSpec("[CLS] -> patch attention of a ViT layer, head mean", "vit_attention", True),
    "received_attention": SignalSpec("attention a patch receives in a ViT layer (query and head mean)",
                                     "vit_attention"),
    "instruction": SignalSpec("embeddings of the text tokens that follow the visual tokens"),
    "text_attention": SignalSpec("attention of text queries to each candidate at decoder layer K-1",
                                 "decoder_attention"),
    "text_attention_rows": SignalSpec("attention of each instruction token to each candidate at decoder layer K-1",
                                      "decoder_attention"),
    "hidden_prev": SignalSpec("input of decoder layer K-1 at each candidate", "decoder_input"),
    "prev_queries": SignalSpec("post-RoPE queries of decoder layer K-1 at each candidate", "decoder_attention"),
    "prev_keys": SignalSpec("post-RoPE keys of decoder layer K-1 (candidates, or the text after the span)",
                            "decoder_attention"),
    "text_tokens": SignalSpec("the stage's representation of the text after each span"),
    "final_norm": SignalSpec("the LLM's final norm as a callable"),
    "instruction_ids": SignalSpec("token ids of the text after the visual tokens"),
    "vit_cls": SignalSpec("[CLS] hidden state of a ViT layer (of each candidate's tile)", "vit_output", True),
    "padding_fraction": SignalSpec("share of a patch that is pad-to-square fill", "pixels"),
    "embed_tokens": SignalSpec("the LLM's input embedding table"),
    "transition": SignalSpec("per-token statistics of the accumulation layers' sub-layers (TransPrune)",
                             "sublayers"),
    "projector": SignalSpec("the projector as a callable"),
    "grid": SignalSpec("(group, row, col) of each candidate in its image / frame grid"),
    "frame": SignalSpec("video frame of each candidate (0 for images; Qwen: the temporal patch)"),
    "prompt_positions": SignalSpec("index of each candidate in its unpadded prompt"),
    "vit_depth": SignalSpec("number of layers of the vision tower (what depth-relative ViT layer defaults read)"),
}
assert all(spec.source in SOURCES for spec in SIGNAL_TABLE.values())


@dataclass(frozen=True)
class ProjectorMLP:
    """The structure of a projector M(x) = lin2(act(lin1(norm(x)))), as a family's adapter knows it: ``norm`` is
    None, a LayerNorm or an RMSNorm applied to every consecutive group of ``norm.weight.numel()`` features (Qwen's
    merger normalises each of the merge^2 patches of a merged row; InternVL the whole row)."""

    lin1: Any
    act: Any
    lin2: Any
    norm: Any = None


class Projector:
    """The ``projector`` signal: a callable on (..., Dfeat) vision features, with its :class:`ProjectorMLP`
    structure when the adapter knows it (``parts``; None otherwise)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], parts: ProjectorMLP | None = None) -> None:
        self.fn, self.parts = fn, parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class SignalSource(Protocol):
    """What a host provides behind a :class:`Signals` view (the Hugging Face one: ``engine/view.py``)."""

    def signal(self, name: str, sig: Signals, **kw: Any) -> Any: ...


class Signals:
    """Signals of S spans with N candidates each. Every tensor property is indexed ``(S, N, ...)``.

    Attributes:
        stage: ``"vision"``, ``"input"`` or ``"layer"``.
        layer: the decoder layer K for the layer stage, else None.
        rows: (S,) batch row of each span.
        positions: (S, N) positions of the candidates in the current sequence.
        ordinals: (S,) index of each span among the spans of its sample (stable under batching).
        budget: the step's :class:`~vtprune.budget.Budget` (None on plain tensors unless given), for methods
            whose reference reads the rate itself, not only the count (VidCom2's per-frame shares).
    """

    def __init__(
        self,
        source: SignalSource | None,
        *,
        stage: str,
        layer: int | None,
        rows: torch.Tensor,
        positions: torch.Tensor,
        ordinals: torch.Tensor,
        given: dict[str, Any] | None = None,
        owner: str = "",
        budget: Any = None,
    ) -> None:
        self._source = source
        self.budget = budget
        self.owner = owner  # the method reading these signals (for error messages)
        self.stage = stage
        self.layer = layer
        self.rows = rows  # (S,)
        self.positions = positions  # (S, N)
        self.ordinals = ordinals  # (S,)
        self._given = dict(given or {})

    @classmethod
    def from_tensors(cls, *, stage: str = "input", layer: int | None = None, budget: Any = None,
                     **signals: Any) -> Signals:
        """Signals over plain tensors, for running a method without a model.

        Example::

            sig = Signals.from_tensors(tokens=torch.randn(2, 576, 4096))
            keep = vtprune.method("kcenter").select(sig, k=64)      # (2, 64)

        Each keyword is a signal of ``vtprune.types.SIGNALS`` with the shape its accessor documents; it
        serves every option of that accessor, or give a dict keyed by the option's value, e.g.
        ``prev_keys={"visual": keys, "text": (text_keys, text_mask)}``. Layer-stage methods want
        ``stage="layer"``; ``budget`` is the step's Budget for methods that read the rate.
        tests/test_methods.py runs every registered method this way.
        """
        first = next((v for v in signals.values() if torch.is_tensor(v) and v.dim() >= 2), None)
        if first is None:
            raise ValueError("from_tensors needs at least one (S, N, ...) tensor signal, e.g. tokens=")
        S, N = first.shape[:2]
        return cls(
            None,
            stage=stage,
            layer=layer,
            rows=torch.arange(S, device=first.device),
            positions=torch.arange(N, device=first.device).expand(S, N),
            ordinals=torch.zeros(S, dtype=torch.long, device=first.device),
            given=signals,
            budget=budget,
        )

    # ------------------------------------------------------------------ plumbing
    @property
    def num_spans(self) -> int:
        return self.positions.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def _get(self, name: str, **kw: Any) -> Any:
        key = name if not kw else (name, tuple(sorted(kw.items())))
        if key in self._given:
            value = self._given[key]
        elif name in self._given:  # a plain value given to from_tensors serves every option ...
            value = self._given[name]
            if isinstance(value, dict) and len(kw) == 1:  # ... or a dict keyed by the option's value
                value = value[next(iter(kw.values()))]
        elif self._source is None:
            raise KeyError(f"signal {name!r} was not given to Signals.from_tensors(...)")
        else:
            value = self._source.signal(name, self, **kw)
        self._check_finite(name, value)
        self._given[key] = value
        return value

    def _check_finite(self, name: str, value: Any) -> None:
        """NaN / inf in a signal would make any selection arbitrary: refuse it, for every method alike."""
        for t in value if isinstance(value, tuple) else (value,):
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                who = f"method {self.owner!r}: " if self.owner else ""
                raise FloatingPointError(
                    f"{who}signal {name!r} has {bad} non-finite value(s) (NaN / inf in the model's features or "
                    "activations); refusing to select from it")

    # ------------------------------------------------------------------ signals
    @cached_property
    def tokens(self) -> torch.Tensor:
        """(S, N, D) the sequence representation where the method acts (LLM input or layer-K input)."""
        return self._get("tokens")

    @cached_property
    def prompt_positions(self) -> torch.Tensor:
        """(S, N) long: each candidate's index in its unpadded prompt (independent of batch padding)."""
        return self._get("prompt_positions")

    @cached_property
    def projected(self) -> torch.Tensor:
        """(S, N, D) projector outputs, i.e. the LLM input embeddings of the candidates."""
        return self._get("projected")

    @cached_property
    def vit_features(self) -> torch.Tensor:
        """(S, N, Dv) vision features fed to the projector."""
        return self._get("vit_features")

    def vit_keys(self, vit_layer: int | None = None, *, heads: bool = False) -> torch.Tensor:
        """Keys of a ViT layer at each candidate's patch: (S, N, Dk) with heads concatenated, or
        (S, N, H, d) with ``heads=True`` (a merged token averages its patches). ``vit_layer`` is a
        hidden-states index as in ``vision_feature_layer`` (None: the model's)."""
        return self._get("vit_keys", vit_layer=vit_layer, heads=heads)

    def vit_cls(self, vit_layer: int | None = None) -> torch.Tensor:
        """(S, N, Dv) the [CLS] hidden state of each candidate's tile at hidden-states index ``vit_layer``
        (None: the feature layer) — VisionZip carries it as one of the kept tokens."""
        return self._get("vit_cls", vit_layer=vit_layer)

    @cached_property
    def padding_fraction(self) -> torch.Tensor:
        """(S, N) fraction of each candidate's patch that is pad-to-square fill (LLaVA-1.5), else 0."""
        return self._get("padding_fraction")

    @cached_property
    def embed_tokens(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The LLM's input embedding table (token ids -> (..., D))."""
        return self._get("embed_tokens")

    def transition(self, direction: str = "cos") -> torch.Tensor:
        """(S, N) TransPrune's token transition variation summed over the accumulation layers below K;
        ``direction="cos"``: 1 - cos (official code), ``"abs"``: 1 - |cos| (paper)."""
        return self._get("transition", direction=direction)

    @property
    def has_cls(self) -> bool:
        """Whether the vision tower has a [CLS] token (``cls_attention`` is available)."""
        if self._source is None:
            return "cls_attention" in self._given
        return bool(getattr(self._source, "has_cls", False))

    def received_attention(self, vit_layer: int | None = None) -> torch.Tensor:
        """(S, N) attention each candidate's patch(es) receive in a ViT layer, averaged over the queries of
        its image (or attention window) and over heads; summed over the patches a token merges (Qwen's
        2x2, InternVL's pixel shuffle). Available for every tower, with or without [CLS]."""
        return self._get("received_attention", vit_layer=vit_layer)

    def cls_attention(self, vit_layer: int | None = None) -> torch.Tensor:
        """(S, N) attention of the [CLS] query to each candidate's patch, head mean, in the ViT layer
        producing hidden state ``vit_layer`` (None: the layer the model takes its features from).
        Recomputed from that layer's q/k, so the ViT stays on sdpa."""
        return self._get("cls_attention", vit_layer=vit_layer)

    @cached_property
    def instruction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((S, T, D) embeddings, (S, T) bool mask) of the text tokens after the sample's visual tokens."""
        return self._get("instruction")

    def text_attention(self, query: str = "last", *, per_head: bool = False, layer: str = "prev") -> torch.Tensor:
        """Attention of text queries to each candidate, recomputed from q/k of one decoder layer.

        ``query="last"``: the last prompt token (FastV); ``"instruction"``: mean over the text tokens
        after the visual tokens. ``layer="prev"``: decoder layer K-1 (as it ran); ``"self"``: layer K on
        its own input, before it runs (TransPrune's IGA). Returns (S, N), or (S, H, N) with
        ``per_head=True``. Never builds the full L x L map: only the query rows are computed.
        """
        return self._get("text_attention", query=query, per_head=per_head, layer=layer)

    @cached_property
    def text_attention_rows(self) -> torch.Tensor:
        """(S, T, N) attention of each instruction token (the ``instruction`` signal's T tokens, in its order; rows of
        padded tokens are zero) to each candidate at decoder layer K-1, head mean, softmax over the row's keys."""
        return self._get("text_attention_rows")

    @cached_property
    def prev_queries(self) -> torch.Tensor:
        """(S, N, H, d) post-RoPE queries of decoder layer K-1 at the candidates (EntropyPrune)."""
        return self._get("prev_queries")

    def prev_keys(self, part: str = "visual") -> Any:
        """Post-RoPE keys of decoder layer K-1 before GQA repetition: (S, N, Hkv, d) at the candidates,
        or ((S, T, Hkv, d), (S, T) mask) for ``part="text"``, the text after each span (DART)."""
        return self._get("prev_keys", part=part)

    @cached_property
    def text_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((S, T, D), (S, T) mask): the stage's representation of the text after each span."""
        return self._get("text_tokens")

    @cached_property
    def final_norm(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The LLM's final norm (DART compares hidden states after it)."""
        return self._get("final_norm")

    @cached_property
    def instruction_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((S, T) token ids, (S, T) mask) of the text after the sample's visual tokens."""
        return self._get("instruction_ids")

    @cached_property
    def hidden_prev(self) -> torch.Tensor:
        """(S, N, D) input of decoder layer K-1 at each candidate (layer stage only)."""
        return self._get("hidden_prev")

    @cached_property
    def projector(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model's projector: (..., Dv) vision features -> (..., D) LLM embeddings."""
        return self._get("projector")

    @cached_property
    def vit_depth(self) -> int:
        """Layers of the model's vision tower (hidden-states indices run 0..vit_depth)."""
        return int(self._get("vit_depth"))

    @cached_property
    def frame(self) -> torch.Tensor:
        """(S, N) long: each candidate's video frame (0 for an image; Qwen: its temporal patch)."""
        return self._get("frame")

    @cached_property
    def grid(self) -> torch.Tensor:
        """(S, N, 3) long: (group, row, col) of each candidate. Groups are a span's separate grids:
        LLaVA-NeXT's base tile (0) and AnyRes canvas (1), or a video's frames."""
        return self._get("grid")
