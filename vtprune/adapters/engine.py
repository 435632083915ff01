"""The hook machinery shared by every adapter: find the spans, run the methods, drop tokens, keep the
positions, masks and KV cache right through prefill and decode.

Where tokens are dropped (see HF_INTERNALS §4-§5):

* before the LLM (``vision`` / ``input`` methods): a forward pre-hook on ``language_model`` gathers
  ``inputs_embeds``, the 2-D ``attention_mask`` and ``position_ids`` once, in prefill. Every decoder layer
  and the KV cache then hold the pruned sequence; decode steps get the pruned prefix of the mask.
* at decoder layer K (``layer`` methods): a pre-hook on layer K gathers the hidden states; pre-hooks on
  layers K.. gather the per-layer kwargs (rotary cos/sin, position ids, mask) the model computed for the
  LLM input. The cache is ragged (layers < K hold more keys); at decode the mask of layers >= K is re-cut.

Kept tokens keep their ORIGINAL positions unless ``positions="compact"``. The pruned sequences of a
batch can differ in length: rows are left-padded with masked slots that point at dropped tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from vtprune import compat
from vtprune.adapters.base import Adapter, VisionRecord
from vtprune.adapters.sequence import build_mask, compact_positions, take, take_mask, take_positions
from vtprune.adapters.stage_view import StageView
from vtprune.kernels import gather_sequence
from vtprune.budget import Budget
from vtprune.methods.base import Method, Selection
from vtprune.signals import Signals
from vtprune.types import PruneStats, SpanStats, StageStats


@dataclass
class Step:
    """One method at one stage with its resolved budget."""

    method: Method
    budget: Budget
    label: str  # "vision" | "input" | "layer:K"
    layer: int | None  # K for layer steps


@dataclass
class IndexMap:
    """Current sequence -> base (LLM input) sequence: ``index[b, j]`` is the base position of slot j,
    ``valid[b, j]`` is False for padding slots we added (which point at a dropped token and are masked)."""

    index: torch.Tensor  # (B, L_cur) long
    valid: torch.Tensor  # (B, L_cur) bool
    version: int = 0


@dataclass
class Layout:
    """Per-position facts about the ORIGINAL sequence of one prefill, all (B, L)."""

    visual: torch.Tensor  # bool: a visual token (placeholder), structural ones included
    cand: torch.Tensor  # bool: a visual token a method may select (not structural)
    image: torch.Tensor  # long: global image index (-1 text)
    frame: torch.Tensor  # long: frame within the image
    src: torch.Tensor  # long: row of the flattened ViT token array (-1 none)
    grid: torch.Tensor  # (B, L, 3) long
    line: torch.Tensor  # long: canvas-row id for the newline rule (-1 none)
    vtok: torch.Tensor  # long: index of the visual token in layout order (records, images, tokens); -1 text


@dataclass
class Forward:
    """State of one prefill: the original sequence, captured signals and the current index maps."""

    layout: Layout
    records: list[VisionRecord]  # in layout order; ``layout.src`` indexes their concatenated ViT rows
    embeds: torch.Tensor  # (B, L, D) LLM input embeddings, original coordinates (overrides written here)
    projected: torch.Tensor  # (B, L, D) the same, never overridden
    mask0: torch.Tensor  # (B, L) long 2-D attention mask of the original sequence
    input_ids: torch.Tensor | None  # (B, L) the prompt's token ids, if the model got them
    base: IndexMap  # LLM input -> original
    base_mask: torch.Tensor | None = None  # (B, L0) long mask of the LLM input
    layer_maps: dict[int, IndexMap] = field(default_factory=dict)  # first layer -> map into base
    captures: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)
    kwargs_memo: dict[Any, Any] = field(default_factory=dict)

    def map_at(self, layer: int) -> IndexMap | None:
        """The map of the hidden states entering ``layer`` (None: the base sequence)."""
        keys = [k for k in self.layer_maps if k <= layer]
        return self.layer_maps[max(keys)] if keys else None


@dataclass
class Generation:
    """What decode steps need from the prefill that pruned; paired with that prefill's KV cache object."""

    orig_len: int  # L: prompt length as the caller sees it
    base_len: int  # L0: length of the LLM input after pre-LLM pruning
    base_mask: torch.Tensor  # (B, L0)
    base_pruned: bool
    has_pads: bool
    pos_shift: torch.Tensor | None  # (B,) compact-position shift at the LLM input
    layer_maps: dict[int, IndexMap]
    layer_shift: dict[int, torch.Tensor]  # first layer -> (B,) extra compact shift for layers >= it

    def map_at(self, layer: int) -> tuple[int, IndexMap] | None:
        keys = [k for k in self.layer_maps if k <= layer]
        return (max(keys), self.layer_maps[max(keys)]) if keys else None


@dataclass
class Call:
    """One forward of the VLM (``model.model``): what it was given and the state of its LLM pass. Every
    hook reads the innermost active call, so state never leaks from one forward into another."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    gave_positions: bool  # the caller passed position_ids or a mask (Qwen then derives no rope_deltas)
    encoded: dict[str, Any]  # modality -> the pre-encoded features (``mm_encoder_outputs``) it was given
    produced: dict[str, VisionRecord] = field(default_factory=dict)  # feature calls made during this forward
    phase: str | None = None  # "prefill" | "decode" while the LLM runs; None: pass through
    fwd: Forward | None = None
    gen: Generation | None = None
    cache: Any = None  # the KV cache of a decode step
    stats: PruneStats | None = None
    last_layer: int = -1
    memo: dict[Any, Any] = field(default_factory=dict)  # per-forward cuts shared by decoder layers


@dataclass
class LossCall:
    """A top-level forward given ``labels``: the loss is computed after pruning, on the kept tokens."""

    labels: torch.Tensor  # (B, L) in the caller's (original) coordinates
    extra: dict[str, Any]  # loss kwargs (num_items_in_batch, ignore_index)
    kept: list[torch.Tensor] | None = None  # per row, original positions that reach the LM head (None: all)


def _expanded(images: list, mask: torch.Tensor, factor: int) -> list:
    """generate() encodes the images once, then repeats every sample ``factor`` times (beams,
    ``num_return_sequences``): rows s*factor .. s*factor+factor-1 all show sample s's images. Repeat the
    layouts the same way (HF's ``_expand_multimodal_outputs``), grouping images per sample by token count.
    Used only where the features are one stacked tensor (the repetition then copies it); a list of
    per-image tensors is matched element by element instead (see :meth:`Engine._images_for`)."""
    B = mask.shape[0]
    if B % factor:
        return images
    counts = mask.sum(1).tolist()
    out, i = [], 0
    for s in range(B // factor):
        need, group = counts[s * factor], []
        while need > 0 and i < len(images):
            group.append(images[i])
            need -= images[i].num_tokens
            i += 1
        out += group * factor
    return out


def _pooled(output: Any) -> Any:
    """The per-image features of a feature call's output (a list / tuple of tensors, or one tensor)."""
    return getattr(output, "pooler_output", None) if not torch.is_tensor(output) else output


class Engine:
    """Installs the hooks for one ``prune()`` call and runs the steps. One per handle.

    State is paired with what it belongs to, never with "the last call": a feature call's record with the
    output object it returned (``mm_encoder_outputs`` of a later forward finds it there), a forward's
    state with its :class:`Call` (a stack: the innermost forward), decode state with the KV cache object
    its prefill filled.
    """

    def __init__(self, adapter: Adapter, steps: list[Step], positions: str, stats_box: list[PruneStats]) -> None:
        self.adapter = adapter
        self.steps = steps
        self.pre_steps = [s for s in steps if s.layer is None]
        self.layer_steps: dict[int, list[Step]] = {}
        for s in steps:
            if s.layer is not None:
                self.layer_steps.setdefault(s.layer, []).append(s)
        self.positions = positions
        self._stats_box = stats_box  # the handle reads stats_box[0]
        self._pending: VisionRecord | None = None  # the feature call running now (ViT hooks fill it)
        self._encoded: WeakIdKeyDictionary = WeakIdKeyDictionary()  # feature output -> its VisionRecord
        self._generations: WeakIdKeyDictionary = WeakIdKeyDictionary()  # KV cache -> Generation
        self._calls: list[Call] = []  # active VLM forwards, innermost last
        self._losses: list[LossCall | None] = []  # active top-level forwards
        self._needs_pixels = False

    # ================================================================== installation
    def install(self, patcher: Any) -> None:
        a = self.adapter
        vlm, lm = a.vlm, a.language_model
        for modality, (fn_name, _) in a.modalities.items():
            patcher.wrap_method(vlm, fn_name, self._wrap_features(modality))
        if hasattr(a.model, "generate"):
            patcher.wrap_method(a.model, "generate", self._wrap_generate, what="vtprune: refuse chunked prefill")
        if a.model is not vlm:  # labels= is taken by the top-level model: cut them with the tokens
            patcher.pre_hook(a.model, self._on_model, what="vtprune: hold labels until the tokens are cut")
            patcher.post_hook(a.model, self._after_model, what="vtprune: loss on the kept tokens", always_call=True)
        patcher.pre_hook(vlm, self._on_vlm, what="vtprune: open a forward")
        patcher.post_hook(vlm, self._after_vlm, what="vtprune: close a forward", always_call=True)
        patcher.pre_hook(lm, self._on_lm, what="vtprune: prune the LLM input")
        patcher.post_hook(lm, self._after_lm, what="vtprune: finish prefill")
        methods = [s.method for s in self.steps]
        needs = set().union(*(m.required_signals(a.has_cls) for m in methods)) if methods else set()
        vit_layers = {a.feature_hidden_index(getattr(m, "vit_layer", None)) for m in methods
                      if m.required_signals(a.has_cls) & {"cls_attention", "vit_keys", "received_attention"}}
        for h in sorted(vit_layers):
            patcher.pre_hook(a.vit_attention(h), self._capture_vit(h), what=f"vtprune: capture ViT attention input {h}")
        if "vit_features" in needs:
            patcher.pre_hook(a.projector, self._capture_features, what="vtprune: capture projector input")
        self._needs_pixels = "padding_fraction" in needs
        cls_layers = {a.feature_hidden_index(getattr(m, "vit_layer", None)) for m in methods
                      if "vit_cls" in m.required_signals(a.has_cls)}
        for h in sorted(cls_layers):
            patcher.post_hook(a.vit_layers()[h - 1], self._capture_vit_out(h), what=f"vtprune: capture ViT output {h}")
        for m in methods:  # TransPrune-style transition variation on the accumulation layers
            if "transition" in m.required_signals(a.has_cls):
                for l in m.transition_layers(a.num_layers):
                    layer = a.decoder_layers[l]
                    patcher.post_hook(layer.self_attn, self._capture_transition(l, "attn"),
                                      what=f"vtprune: transition of layer {l} attention")
                    patcher.post_hook(layer.mlp, self._capture_transition(l, "mlp"),
                                      what=f"vtprune: transition of layer {l} MLP")
        if self.layer_steps:
            layers = a.decoder_layers
            for l in range(min(self.layer_steps), len(layers)):
                patcher.pre_hook(layers[l], self._layer_hook(l), what=f"vtprune: decoder layer {l}")
            for K, steps in self.layer_steps.items():
                req = set().union(*(s.method.required_signals(a.has_cls) for s in steps))
                if req & {"text_attention", "prev_queries", "prev_keys"}:
                    patcher.pre_hook(layers[K - 1].self_attn, self._capture_attn(K - 1),
                                     what=f"vtprune: capture layer {K - 1} attention input")
                if "hidden_prev" in req:
                    patcher.pre_hook(layers[K - 1], self._capture_hidden(K - 1),
                                     what=f"vtprune: capture layer {K - 1} input")
        a.install_extra(self, patcher)

    @staticmethod
    def _wrap_generate(original: Callable[..., Any]) -> Callable[..., Any]:
        def generate(*args: Any, **kwargs: Any) -> Any:
            config = kwargs.get("generation_config") or getattr(original.__self__, "generation_config", None)
            chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
            if chunk:  # later chunks would bring visual tokens to a cache holding a pruned prefix
                raise NotImplementedError(f"vtprune prunes a prompt in one prefill; chunked prefill "
                                          f"(prefill_chunk_size={chunk}) is not supported")
            return original(*args, **kwargs)

        return generate

    # ================================================================== forwards
    @property
    def call(self) -> Call | None:
        """The innermost VLM forward running now (None outside one)."""
        return self._calls[-1] if self._calls else None

    def _prefilling(self) -> Call | None:
        call = self.call
        return call if call is not None and call.phase == "prefill" and call.fwd is not None else None

    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        labels = kwargs.get("labels")
        if labels is None:
            self._losses.append(None)
            return None
        extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        self._losses.append(LossCall(labels=labels, extra=extra))
        return args, {k: v for k, v in kwargs.items() if k != "labels"}

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ctx = self._losses.pop() if self._losses else None
        if ctx is None or output is None:
            return None
        logits = output["logits"] if isinstance(output, dict) else output[0]
        loss = self._loss(module, logits, ctx)
        if isinstance(output, dict):  # rebuild so that `loss` comes first, as the model would have put it
            return type(output)(**{"loss": loss, **{k: v for k, v in output.items() if k != "loss"}})
        return (loss, *output)

    @staticmethod
    def _loss(module: nn.Module, logits: torch.Tensor, ctx: LossCall) -> torch.Tensor:
        """The model's own causal-LM loss. Pruned: each kept row predicts the label that followed its token
        in the ORIGINAL sequence, rows of dropped tokens (no logits) predict nothing; equal to the loss of
        the masked reference with the dropped rows' targets ignored (in SFT data, image rows are ignored)."""
        labels = ctx.labels
        vocab = logits.shape[-1]
        if ctx.kept is None:
            return module.loss_function(logits=logits, labels=labels, vocab_size=vocab, **ctx.extra)
        ignore = ctx.extra.get("ignore_index", -100)
        shifted = F.pad(labels, (0, 1), value=ignore)[:, 1:]  # (B, L): next-token target of each position
        B, R = logits.shape[:2]
        target = torch.full((B, R), ignore, dtype=labels.dtype, device=labels.device)  # (B, R)
        for b, pos in enumerate(ctx.kept):  # kept tokens fill the last slots of their row, in order
            m = min(pos.numel(), R)
            if m:
                target[b, R - m:] = shifted[b, pos[pos.numel() - m:].to(labels.device)]
        return module.loss_function(logits=logits, labels=None, shift_labels=target, vocab_size=vocab, **ctx.extra)

    def _on_vlm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        self._calls.append(Call(
            input_ids=kwargs.get("input_ids", args[0] if args else None),
            inputs_embeds=kwargs.get("inputs_embeds"),
            gave_positions=kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None,
            encoded={m: out for m, out in encoded.items() if out is not None},
        ))

    def _after_vlm(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._calls:
            self._calls.pop()

    # ================================================================== capture hooks
    def _wrap_features(self, modality: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            def get_features(*args: Any, **kwargs: Any) -> Any:
                if self._pending is not None:  # nested (Qwen3-VL's video path calls the image one)
                    return original(*args, **kwargs)
                record = VisionRecord(modality=modality)
                if self._needs_pixels:  # references only, for signals computed from the input image
                    record.stash["pixels"] = kwargs.get(f"pixel_values{'_videos' if modality == 'video' else ''}",
                                                        args[0] if args else None)
                self._pending = record
                try:
                    out = original(*args, **kwargs)
                finally:
                    self._pending = None
                self.adapter.image_layouts(modality, args, kwargs, out, record)
                record.produced = list(record.images)
                pooled = _pooled(out)
                record.meta["pooled"] = list(pooled) if isinstance(pooled, (list, tuple)) else pooled
                try:
                    self._encoded[out] = record  # a later forward given these features finds their record
                except TypeError:  # not weak-referenceable (a plain tuple from return_dict=False)
                    pass
                call = self.call
                if call is not None:  # made inside a forward (pixels passed to it): the features it places
                    call.produced[modality] = record
                return out

            return get_features

        return wrap

    def _capture_vit(self, h: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._pending is not None:
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                # references only: q/k are recomputed from these if (and only if) a method asks
                self._pending.stash[("vit_in", h)] = {
                    "x": x.detach(), "cu_seqlens": kwargs.get("cu_seqlens"),
                    "position_embeddings": kwargs.get("position_embeddings"),
                }

        return hook

    def _capture_vit_out(self, h: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._pending is not None:
                out = output[0] if isinstance(output, tuple) else output
                self._pending.stash[("vit_out", h)] = out.detach()

        return hook

    def _capture_transition(self, l: int, part: str) -> Callable[..., None]:
        """Token transition variation (TransPrune) of one sub-layer: its normed input vs its output before
        the residual add; magnitude ratio and cosine, kept in LLM-input coordinates."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            call = self._prefilling()
            if call is None:
                return
            fwd = call.fwd
            x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x_out = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                x_in, x_out = x_in.float(), x_out.float()
                mag = x_out.norm(dim=-1) / x_in.norm(dim=-1).clamp(min=1e-12)  # (B, Lc)
                cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)  # (B, Lc)
                m = fwd.map_at(l) or self._base_identity(fwd)
                attend = self._attend(fwd, m)
                parts = fwd.captures.setdefault(("transition", l), {})
                for variant, direction in (("cos", 1 - cos), ("abs", 1 - cos.abs())):
                    n = direction.masked_fill(~attend, float("-inf")).softmax(-1)  # over the row's tokens
                    ttv = torch.zeros_like(fwd.base_mask, dtype=torch.float32)
                    ttv.scatter_(1, m.index.clamp(min=0), torch.where(m.valid, mag * n, 0.0))
                    parts[(part, variant)] = ttv  # (B, L0) in LLM-input coordinates

        return hook

    def _capture_features(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._pending is not None:
            x = args[0] if args else next(iter(kwargs.values()))
            self._pending.stash["features"] = x.detach()

    def _capture_attn(self, l: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = self._prefilling()
            if call is not None:
                call.fwd.captures[("attn", l)] = {
                    "x": (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach(),
                    "pe": kwargs.get("position_embeddings"),
                    "cache": compat.cache_in(kwargs),
                }

        return hook

    def _capture_hidden(self, l: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = self._prefilling()
            if call is not None:
                x = args[0] if args else kwargs["hidden_states"]
                call.fwd.captures[("hidden", l)] = {"x": x.detach()}

        return hook

    # ================================================================== LLM input
    def _on_lm(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.call
        if call is None:  # the language model called on its own: no images to prune
            return None
        cache = compat.cache_in(kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise NotImplementedError(
                "vtprune drops tokens, which a static (compileable) KV cache cannot hold; use the default DynamicCache"
            )
        if cache is None or cache.get_seq_length() == 0:
            return self._prefill(call, args, kwargs)
        return self._decode(call, kwargs, cache)

    def _images_for(self, call: Call, modality: str, mask: torch.Tensor) -> VisionRecord | None:
        """The record of the features this forward places for ``modality``, with its per-image layouts in
        placement order (generate() may have repeated the images for beams / ``num_return_sequences``)."""
        given = call.encoded.get(modality)
        if given is None:
            return call.produced.get(modality)
        record = self._encoded.get(given)
        if record is None:  # encoded before prune() or outside its hooks: no layout or signals known
            return None
        pooled, produced = _pooled(given), record.meta.get("pooled")
        if pooled is produced or (isinstance(pooled, (list, tuple)) and isinstance(produced, list)
                                  and len(pooled) == len(produced) and all(a is b for a, b in zip(pooled, produced))):
            return record
        if isinstance(pooled, (list, tuple)) and isinstance(produced, list) and len(produced) == len(record.produced):
            by_id = {id(t): im for t, im in zip(produced, record.produced)}
            if all(id(t) in by_id for t in pooled):  # repeated element by element: follow the repetition
                return dataclasses.replace(record, images=[by_id[id(t)] for t in pooled])
        n_feat, n_visual = sum(im.num_tokens for im in record.produced), int(mask.sum())
        if n_feat and n_visual != n_feat and n_visual % n_feat == 0:  # a stacked tensor, repeated as a whole
            return dataclasses.replace(record, images=_expanded(record.produced, mask, n_visual // n_feat))
        return record

    def _layout(self, call: Call, masks: dict[str, torch.Tensor]) -> tuple[Layout, list[VisionRecord]]:
        """Assign every placeholder its image, frame, grid cell and ViT source, modality by modality, in
        the row-major order ``masked_scatter`` fills them."""
        first = next(iter(masks.values()))
        B, L = first.shape
        dev = first.device
        visual = torch.zeros(B, L, dtype=torch.bool, device=dev)
        fields = {k: torch.full((B, L), -1, dtype=torch.long, device=dev) for k in ("image", "src", "line", "vtok")}
        fields["frame"] = torch.zeros(B, L, dtype=torch.long, device=dev)
        grid = torch.full((B, L, 3), -1, dtype=torch.long, device=dev)
        records: list[VisionRecord] = []
        n_images = vit_offset = line_offset = 0
        for modality, mask in masks.items():
            n_visual = int(mask.sum())
            if n_visual == 0:
                continue
            record = self._images_for(call, modality, mask)
            if record is None or not record.images:
                record = self.adapter.default_layouts(modality, n_visual)
                if record is None:
                    raise RuntimeError(
                        f"{self.adapter.family}: vtprune saw {n_visual} {modality} tokens but not the "
                        f"{self.adapter.modalities[modality][0]} call that made their features; pass the pixel "
                        "values (or features encoded while the model is pruned) so the layout is known"
                    )
            n_feat = sum(im.num_tokens for im in record.images)
            if n_feat != n_visual:
                raise ValueError(f"{modality} placeholders and features do not match: {n_visual} placeholder "
                                 f"tokens, {n_feat} features")
            cat = lambda xs: torch.cat(xs).to(dev)  # noqa: E731
            src = cat([im.src for im in record.images])
            fields["src"][mask] = torch.where(src >= 0, src + vit_offset, src)  # -1 structural, -2 unknown
            fields["image"][mask] = cat([torch.full((im.num_tokens,), n_images + i)
                                         for i, im in enumerate(record.images)])
            fields["frame"][mask] = cat([im.frame for im in record.images])
            grid[mask] = cat([im.grid for im in record.images])
            lines = []
            for im in record.images:  # make canvas-row ids unique across images
                lines.append(torch.where(im.line >= 0, im.line + line_offset, im.line))
                line_offset += int(im.line.max()) + 1 if im.line.numel() and im.line.max() >= 0 else 0
            fields["line"][mask] = cat(lines)
            fields["vtok"][mask] = torch.arange(n_visual, device=dev) + int(visual.sum())
            visual |= mask
            n_images += len(record.images)
            vit_offset += record.n_vit
            records.append(record)
        if self.adapter.images_are_runs:  # one image = one contiguous run of placeholders (InternVL tiles)
            start = visual & ~torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=dev), visual[:, :-1]], 1)
            run = torch.cumsum(start.reshape(-1).long(), 0).reshape(B, L) - 1
            fields["image"] = torch.where(visual, run, -1)
        layout = Layout(visual=visual, cand=visual & fields["src"].ne(-1), image=fields["image"],
                        frame=fields["frame"], src=fields["src"], grid=grid, line=fields["line"],
                        vtok=fields["vtok"])
        return layout, records

    def _prefill(self, call: Call, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        masks = self.adapter.visual_masks(call.input_ids, call.inputs_embeds) if embeds is not None else {}
        if not masks or any(m.shape != embeds.shape[:2] for m in masks.values()) or not any(
                bool(m.any()) for m in masks.values()):
            self._set_stats(PruneStats())  # a prompt with no image passes through untouched
            return None
        B, L, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise NotImplementedError("vtprune needs a 2-D attention_mask (or None); got a custom 4-D mask")
        # the selection needs no gradient; the gathers below keep the graph (training through pruning)
        grad = torch.is_grad_enabled() and embeds.requires_grad
        with torch.no_grad():
            mask0 = mask.long() if mask is not None else torch.ones(B, L, dtype=torch.long, device=embeds.device)
            layout, records = self._layout(call, masks)
            ident = torch.arange(L, device=embeds.device).expand(B, L)
            ids = call.input_ids if call.input_ids is not None and call.input_ids.shape == (B, L) else None
            fwd = Forward(layout=layout, records=records, embeds=embeds, projected=embeds, mask0=mask0,
                          input_ids=ids, base=IndexMap(ident, torch.ones(B, L, dtype=torch.bool, device=embeds.device)))
            call.fwd, call.phase, call.last_layer = fwd, "prefill", -1
            call.stats = stats = PruneStats(visual_before=layout.visual.sum(1).tolist())
            cur = fwd.base
            for step in self.pre_steps:
                out = self._run_step(step, fwd, cur, tokens=None, stats=stats, grad=grad)
                if out is not None:
                    order, new_valid, _ = out
                    cur = IndexMap(torch.where(new_valid, cur.index.gather(1, order), -1), new_valid, cur.version + 1)
            fwd.base = cur
            index = cur.index.clamp(min=0)  # (B, L0)
            fwd.base_mask = mask0.gather(1, index) * cur.valid
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(L, device=embeds.device).expand(B, L)
        base_pruned = cur.version > 0
        pos_shift = None
        new: dict[str, Any] = {}
        if base_pruned:  # one fused pass: kept rows, their positions and mask (vtprune.kernels)
            out = gather_sequence(fwd.embeds, index, cur.valid, position_ids=pos, attention_mask=mask0)
            new["inputs_embeds"] = out.hidden
            new["attention_mask"] = out.attention_mask if mask is None else out.attention_mask.to(mask.dtype)
            new["position_ids"] = out.position_ids
            new.update(self.adapter.extra_lm_inputs(kwargs, index, cur.valid))
        if self.positions == "compact" and base_pruned:
            new["position_ids"], pos_shift = compact_positions(new["position_ids"], fwd.base_mask.bool())
        call.gen = Generation(
            orig_len=L, base_len=index.shape[1], base_mask=fwd.base_mask, base_pruned=base_pruned,
            has_pads=bool((~cur.valid).any()), pos_shift=pos_shift, layer_maps=fwd.layer_maps, layer_shift={},
        )
        cache = compat.cache_in(kwargs)
        if cache is not None:  # an empty cache given to the prefill: its decode steps are ours
            self._generations[cache] = call.gen
        if not new:
            return None
        return args, {**kwargs, **new}

    def _decode(self, call: Call, kwargs: dict, cache: Any) -> tuple[tuple, dict] | None:
        gen = self._generations.get(cache)
        if gen is None:  # not a sequence we pruned: leave it alone
            return None
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1]
        visual = self.adapter.visual_masks(call.input_ids, call.inputs_embeds) if q > 1 else {}
        if any(bool(m.any()) for m in visual.values()):
            raise NotImplementedError(
                "vtprune prunes a prompt's images in one prefill, but this forward brings visual tokens to a KV cache "
                "that already holds a pruned prompt (chunked prefill, or an image in a later turn); run the prompt "
                "in one prefill (no prefill_chunk_size), or start a new cache")
        call.phase, call.gen, call.cache, call.memo = "decode", gen, cache, {}
        if not gen.base_pruned:
            return None
        new: dict[str, Any] = {}
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2 or mask.shape[1] < gen.orig_len:
                raise NotImplementedError(
                    f"decode step got an attention_mask of shape {tuple(mask.shape)}; vtprune expects the 2-D mask "
                    f"of the full (unpruned) sequence, at least {gen.orig_len} long"
                )
            new["attention_mask"] = torch.cat([gen.base_mask.to(mask.dtype), mask[:, gen.orig_len :]], dim=1)
        elif gen.has_pads:
            t = cache.get_seq_length() - gen.base_len + q
            ones = torch.ones(gen.base_mask.shape[0], t, dtype=gen.base_mask.dtype, device=gen.base_mask.device)
            new["attention_mask"] = torch.cat([gen.base_mask, ones], dim=1)
        pos = kwargs.get("position_ids")
        if pos is None:  # what the unpruned model would use: continue after the ORIGINAL length
            start = cache.get_seq_length() + gen.orig_len - gen.base_len
            pos = (torch.arange(q, device=embeds.device) + start).expand(embeds.shape[0], q)
            new["position_ids"] = pos
        elif self.adapter.derives_decode_positions and not call.gave_positions:
            # the VLM counted from the (pruned) cache length: shift to the ORIGINAL length
            pos = pos + (gen.orig_len - gen.base_len)
            new["position_ids"] = pos
        if gen.pos_shift is not None:
            shift = gen.pos_shift[:, None] if pos.dim() == 2 else gen.pos_shift[None, :, None]
            new["position_ids"] = pos - shift
        return (), {**kwargs, **new}

    def _after_lm(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self._prefilling()
        if call is None:
            return
        cache = compat.cache_out(output)
        if cache is not None and call.gen is not None:
            self._generations[cache] = call.gen
        self._finish_stats(call)
        call.fwd, call.phase = None, None  # release captured activations

    # ================================================================== decoder layers
    def current_layer_map(self) -> IndexMap | None:
        """In prefill, the map of the decoder layer that ran last (None: the LLM input sequence)."""
        call = self._prefilling()
        return None if call is None else call.fwd.map_at(call.last_layer)

    def _layer_hook(self, l: int) -> Callable[..., tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            call = self.call
            if call is None:
                return None
            call.last_layer = l
            if call.phase == "prefill" and call.fwd is not None:
                return self._layer_prefill(call, l, args, kwargs)
            if call.phase == "decode" and call.gen is not None:
                return self._layer_decode(call, l, args, kwargs)
            return None

        return hook

    def _layer_prefill(self, call: Call, l: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        fwd = call.fwd
        hidden = args[0] if args else kwargs["hidden_states"]
        if l in self.layer_steps:
            grad = torch.is_grad_enabled() and hidden.requires_grad
            prev = fwd.map_at(l - 1) or self._base_identity(fwd)
            cur = prev
            # slot of each current token in the coordinates of the hidden states entering layer l
            # (where layer l-1's signals were captured); changes if several steps act at layer l
            local = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
            changed = False
            for step in self.layer_steps[l]:
                with torch.no_grad():
                    out = self._run_step(step, fwd, cur, tokens=hidden, stats=call.stats, local=local, prev=prev,
                                         layer_kwargs=kwargs, grad=grad)
                if out is None:
                    continue
                order, new_valid, values = out
                if values is not None:  # merged representations, written before the gather
                    hidden = hidden.clone()
                    rows, pos, vals = values
                    hidden[rows, pos] = vals.to(hidden.dtype)
                hidden = gather_sequence(hidden, order, new_valid).hidden  # (B, L', D)
                local = local.gather(1, order)
                cur = IndexMap(torch.where(new_valid, cur.index.gather(1, order), -1), new_valid, cur.version + 1)
                changed = True
            if changed:
                fwd.layer_maps[l] = cur
                if self.positions == "compact":
                    base_pos = self._base_positions(kwargs, fwd)
                    _, shift = compact_positions(take_positions(base_pos, cur.index.clamp(min=0)),
                                                 self._attend(fwd, cur))
                    call.gen.layer_shift[l] = shift - self._prev_shift(call.gen, l)
        m = fwd.map_at(l)
        if m is None:
            return None
        new_kwargs = self._layer_kwargs(m, kwargs, fwd, hidden)
        if args:
            return (hidden, *args[1:]), {**kwargs, **new_kwargs}
        return args, {**kwargs, **new_kwargs, "hidden_states": hidden}

    def _base_identity(self, fwd: Forward) -> IndexMap:
        B, L0 = fwd.base_mask.shape
        return IndexMap(torch.arange(L0, device=fwd.base_mask.device).expand(B, L0), fwd.base.valid)

    @staticmethod
    def _prev_shift(gen: Generation, l: int) -> torch.Tensor | int:
        earlier = [k for k in gen.layer_shift if k < l]
        return sum(gen.layer_shift[k] for k in earlier) if earlier else 0

    def _attend(self, fwd: Forward, m: IndexMap) -> torch.Tensor:
        return fwd.base_mask.gather(1, m.index.clamp(min=0)).bool() & m.valid

    def _base_positions(self, kwargs: dict, fwd: Forward) -> torch.Tensor:
        pos = kwargs.get("position_ids")
        B, L0 = fwd.base_mask.shape
        if pos is None or pos.shape[-1] != L0:
            raise RuntimeError("vtprune: decoder layers did not receive the LLM input's position_ids")
        return pos.expand(B, L0) if pos.dim() == 2 else pos

    @staticmethod
    def _memo_key(*objs: Any) -> tuple:
        """A memo key of live objects (the memo entry holds them, so their ids cannot be reused meanwhile)."""
        return tuple(id(o) for o in objs)

    def _layer_kwargs(self, m: IndexMap, kwargs: dict, fwd: Forward, hidden: torch.Tensor) -> dict[str, Any]:
        """Per-layer kwargs computed by the model for the LLM input, cut to the current map (memoised for the
        layers of this forward that share them)."""
        objs = (m, kwargs.get("attention_mask"), kwargs.get("position_embeddings"))
        key = self._memo_key(*objs)
        if key in fwd.kwargs_memo:
            return fwd.kwargs_memo[key][1]
        index = m.index.clamp(min=0)
        new: dict[str, Any] = {}
        pos = kwargs.get("position_ids")
        if pos is not None:
            new["position_ids"] = take_positions(self._base_positions(kwargs, fwd), index)
        pe = kwargs.get("position_embeddings")
        if self.positions == "compact":
            new_pos, _ = compact_positions(new["position_ids"], self._attend(fwd, m))
            new["position_ids"] = new_pos
            new["position_embeddings"] = self.adapter.language_model.rotary_emb(hidden, new_pos)
        elif pe is not None:
            new["position_embeddings"] = tuple(take(t, index) for t in pe)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            new["attention_mask"] = take_mask(mask, index, m.valid, q_index=index)
        elif bool((~m.valid).any()):
            valid = m.valid.to(hidden.device)
            new["attention_mask"] = build_mask(self.adapter.attn_implementation(), valid, index.shape[1], hidden.dtype)
        fwd.kwargs_memo[key] = (objs, new)
        return new

    def _layer_decode(self, call: Call, l: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        gen = call.gen
        found = gen.map_at(l)
        if found is None:
            return None
        first, m = found
        mask = kwargs.get("attention_mask")
        objs = (mask, kwargs.get("position_embeddings"))
        key = (first, *self._memo_key(*objs))  # call.memo lives for this decode step only
        if key in call.memo:
            new = call.memo[key][1]
        else:
            new = {}
            hidden = args[0] if args else kwargs["hidden_states"]
            q = hidden.shape[1]
            B = m.index.shape[0]
            t = call.cache.get_seq_length() - gen.base_len  # new tokens so far, incl. this step
            tail = torch.arange(gen.base_len, gen.base_len + t, device=m.index.device).expand(B, t)
            kv_index = torch.cat([m.index.clamp(min=0), tail], dim=1)
            kv_valid = torch.cat([m.valid, torch.ones(B, t, dtype=torch.bool, device=m.valid.device)], dim=1)
            if mask is not None:
                new["attention_mask"] = take_mask(mask, kv_index, kv_valid)
            elif bool((~m.valid).any()):
                kv_valid = kv_valid.to(hidden.device)
                new["attention_mask"] = build_mask(self.adapter.attn_implementation(), kv_valid, q, hidden.dtype)
            shift = sum(s for k, s in gen.layer_shift.items() if k <= l) if gen.layer_shift else None
            if shift is not None and kwargs.get("position_ids") is not None:
                pos = kwargs["position_ids"]
                pos = pos - (shift[:, None] if pos.dim() == 2 else shift[None, :, None])
                new["position_ids"] = pos
                new["position_embeddings"] = self.adapter.language_model.rotary_emb(hidden, pos)
            call.memo[key] = (objs, new)
        if not new:
            return None
        return args, {**kwargs, **new}

    # ================================================================== selection
    def _run_step(
        self, step: Step, fwd: Forward, cur: IndexMap, tokens: torch.Tensor | None, stats: PruneStats | None,
        local: torch.Tensor | None = None, prev: IndexMap | None = None, layer_kwargs: dict | None = None,
        grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple | None] | None:
        """Run one method on the current sequence (under no_grad). Returns (order (B, L') into the current
        sequence, valid (B, L'), merged values or None), or None when nothing is dropped. ``grad``: the
        forward is being differentiated (merged values would carry no gradient: refused)."""
        t0 = time.perf_counter()
        device = cur.index.device
        lay = fwd.layout
        orig = cur.index.clamp(min=0)  # (B, Lc) original positions (via base for layer steps)
        if step.layer is not None:
            orig = fwd.base.index.clamp(min=0).gather(1, orig)
        cand = cur.valid & lay.cand.gather(1, orig)  # (B, Lc)
        policy = step.budget.policy
        if policy in ("per_frame", "temporal"):
            key = lay.image.gather(1, orig) * 1_000_000 + lay.frame.gather(1, orig)
        elif policy == "per_image":
            key = lay.image.gather(1, orig)
        else:
            key = torch.arange(cand.shape[0], device=device)[:, None].expand_as(cand)
        b_idx, p_idx = cand.nonzero(as_tuple=True)  # row-major: a span's tokens stay in sequence order
        keys = key[b_idx, p_idx]
        srt = torch.argsort(keys, stable=True)
        b_idx, p_idx, keys = b_idx[srt], p_idx[srt], keys[srt]
        _, counts = torch.unique_consecutive(keys, return_counts=True)
        counts_l = counts.tolist()
        starts = [0]
        for c in counts_l[:-1]:
            starts.append(starts[-1] + c)
        rows_l = b_idx[torch.tensor(starts, dtype=torch.long, device=device)].tolist() if counts_l else []
        span_keys = keys[torch.tensor(starts, dtype=torch.long, device=device)].tolist() if counts_l else []
        original = self._original_span_sizes(fwd, policy)  # span key -> candidates in the prompt
        view = StageView(self, fwd, step, orig, tokens, local, prev, cur, layer_kwargs)
        keep = cur.valid & ~cand  # text, structural tokens, original padding
        before = cand.sum(1).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        ordinals, seen = [], {}
        span_stats = []
        method = step.method
        temporal = (self._temporal_budgets(step, fwd, view, orig, tokens, p_idx, starts, counts_l, rows_l, span_keys)
                    if policy == "temporal" else None)
        for s, (n, r) in enumerate(zip(counts_l, rows_l)):
            ordinals.append(seen.get(r, 0))
            seen[r] = ordinals[-1] + 1
            # a budget that keeps the whole span keeps it, whatever the method's own counting convention
            k = n if step.budget.count(n) >= n else min(n, method.keep_count(
                step.budget, n, original.get(span_keys[s], n), self.adapter.num_layers, step.layer))
            if temporal is not None and k < n:
                k = temporal[s]
            first = p_idx[starts[s]]
            span_stats.append(SpanStats(row=r, image=int(lay.image[r, orig[r, first]]),
                                        frame=int(lay.frame[r, orig[r, first]]) if policy in (
                                            "per_frame", "temporal") else -1,
                                        n=n, kept=k, budget=k))
            if k >= n and not (method.gate and step.budget.count(n) < n):  # gates run unless nothing may go
                keep[r, p_idx[starts[s] : starts[s] + n]] = True
            else:
                groups.setdefault((n, k), []).append(s)
        merged: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for (n, k), spans in groups.items():
            pos = torch.stack([p_idx[starts[s] : starts[s] + n] for s in spans])  # (S, n)
            rows = torch.tensor([rows_l[s] for s in spans], device=device)  # (S,)
            sig = Signals(view, stage=step.label.split(":")[0], layer=step.layer, rows=rows, positions=pos,
                          ordinals=torch.tensor([ordinals[s] for s in spans], device=device), owner=method.name)
            out = method.select(sig, k)
            sel, values = (out.index, out.values) if isinstance(out, Selection) else (out, None)
            if values is not None and grad:
                raise NotImplementedError(
                    f"method {method.name!r} merges tokens, and its merged values carry no gradient; training "
                    "through vtprune supports methods that only select (run merging methods under torch.no_grad())")
            if values is not None and not bool(torch.isfinite(values).all()):
                raise FloatingPointError(f"method {method.name!r} produced non-finite merged values; refusing them")
            self._check_selection(step, sel, len(spans), n, k)
            kept = pos.gather(1, sel.to(device))  # (S, k) current positions
            drop = out.drop if isinstance(out, Selection) and out.drop is not None else None
            if drop is not None:  # a gate dropped these whole spans (e.g. ToDRE's information migration)
                drop = drop.to(device)
                kept = kept[~drop]
                for j in drop.nonzero()[:, 0].tolist():
                    span_stats[spans[j]].kept = 0
                rows_kept, values = rows[~drop], (values[~drop.to(values.device)] if values is not None else None)
            else:
                rows_kept = rows
            if kept.numel():
                keep[rows_kept[:, None].expand_as(kept), kept] = True
            if values is not None and kept.numel():
                merged.append((rows_kept[:, None].expand_as(kept), kept, values))
        if not groups or bool(keep.eq(cur.valid).all()):
            self._record_stage(stats, step, before, before, span_stats, t0, device)
            return None
        # AnyRes rule: a structural (newline) token survives iff its canvas row keeps a candidate.
        line = lay.line.gather(1, orig)
        structural = cur.valid & ~cand & lay.visual.gather(1, orig) & (line >= 0)
        if bool(structural.any()):
            kept_lines = torch.unique(line[keep & cand & (line >= 0)])
            keep = torch.where(structural, torch.isin(line, kept_lines), keep)
        values_out = None
        if merged:
            rows, pos, vals = (torch.cat([m[i].reshape(-1, *m[i].shape[2:]) for m in merged]) for i in range(3))
            if step.layer is None:  # before the LLM: write into the original-coordinate embeddings
                fwd.embeds = fwd.embeds.clone() if fwd.embeds is fwd.projected else fwd.embeds
                fwd.embeds[rows, orig[rows, pos]] = vals.to(fwd.embeds.dtype)
            else:
                values_out = (rows, pos, vals)
        n_keep = keep.sum(1)
        new_len = int(n_keep.max())
        # Kept slots in order, left-padded with dropped ones (stable sort puts False first).
        order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - new_len :]  # (B, L')
        new_valid = keep.gather(1, order)
        after = (cand & keep).sum(1).tolist()
        self._record_stage(stats, step, before, after, span_stats, t0, device)
        return order, new_valid, values_out

    def _temporal_budgets(self, step: Step, fwd: Forward, view: Any, orig: torch.Tensor, tokens: torch.Tensor | None,
                          p_idx: torch.Tensor, starts: list[int], counts: list[int], rows: list[int],
                          keys: list[int]) -> list[int]:
        """``budget="temporal"``: re-allocate each video's per-frame budgets by frame novelty."""
        means = []
        for s, (n, r) in enumerate(zip(counts, rows)):
            pos = p_idx[starts[s] : starts[s] + n]
            x = fwd.embeds[r, orig[r, pos]] if tokens is None else tokens[r, pos]  # (n, D)
            means.append(x.float().mean(0))
        out = [step.budget.count(n) for n in counts]
        by_video: dict[int, list[int]] = {}
        for s, key in enumerate(keys):
            by_video.setdefault(key // 1_000_000, []).append(s)  # spans come sorted by (image, frame)
        for spans in by_video.values():
            if len(spans) < 2:
                continue
            novelty = [1.0] + [float(1 - torch.nn.functional.cosine_similarity(means[a], means[b], dim=0))
                               for a, b in zip(spans[:-1], spans[1:])]
            weights = [max(v, 1e-3) for v in novelty]
            alloc = Budget.allocate(sum(out[s] for s in spans), weights, [counts[s] for s in spans])
            for s, k in zip(spans, alloc):
                out[s] = k
        return out

    def _original_span_sizes(self, fwd: Forward, policy: str) -> dict[int, int]:
        """Candidates of every span in the prompt, before any stage (methods budget against it)."""
        key = ("span_sizes", policy)
        if key not in fwd.cache:
            lay = fwd.layout
            if policy in ("per_frame", "temporal"):
                k0 = lay.image * 1_000_000 + lay.frame
            elif policy == "per_image":
                k0 = lay.image
            else:
                k0 = torch.arange(lay.cand.shape[0], device=lay.cand.device)[:, None].expand_as(lay.cand)
            u, c = torch.unique(k0[lay.cand], return_counts=True)
            fwd.cache[key] = dict(zip(u.tolist(), c.tolist()))
        return fwd.cache[key]

    @staticmethod
    def _check_selection(step: Step, sel: torch.Tensor, S: int, n: int, k: int) -> None:
        name = step.method.name
        if sel.shape != (S, k) or sel.dtype not in (torch.int64, torch.int32):
            raise RuntimeError(f"method {name!r} returned indices of shape {tuple(sel.shape)} / {sel.dtype}; "
                               f"expected ({S}, {k}) integers")
        if bool((sel < 0).any() or (sel >= n).any()):
            raise RuntimeError(f"method {name!r} returned indices outside [0, {n})")
        hit = torch.zeros(S, n, dtype=torch.bool, device=sel.device).scatter_(1, sel.long(), True)
        if bool((hit.sum(1) != k).any()):
            raise RuntimeError(f"method {name!r} returned duplicate indices; it must keep exactly {k} distinct tokens")

    def _record_stage(self, stats: PruneStats | None, step: Step, before: list[int], after: list[int],
                      spans: list[SpanStats], t0: float, device: torch.device) -> None:
        if stats is None:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.stages.append(StageStats(stage=step.label, method=step.method.name, before=before, after=after,
                                       spans=spans, select_ms=(time.perf_counter() - t0) * 1e3))

    # ================================================================== stats
    def _set_stats(self, stats: PruneStats) -> None:
        self._stats_box[0] = stats

    def _finish_stats(self, call: Call) -> None:
        fwd = call.fwd
        stats = call.stats or PruneStats()
        vis = fwd.layout.visual
        base_idx, base_valid = fwd.base.index.clamp(min=0), fwd.base.valid
        maps = {0: (base_idx, base_valid)}
        for K, m in sorted(fwd.layer_maps.items()):
            maps[K] = (base_idx.gather(1, m.index.clamp(min=0)), m.valid)
        stats.positions_by_layer = {K: [idx[b][valid[b]] for b in range(idx.shape[0])]
                                    for K, (idx, valid) in maps.items()}
        counts = {K: (vis.gather(1, idx) & valid).sum(1) for K, (idx, valid) in maps.items()}
        n_layers = self.adapter.num_layers
        per_layer = torch.stack([counts[max(k for k in counts if k <= l)] for l in range(n_layers)]).float()
        last = max(maps)
        stats.visual_after = counts[last].tolist()
        stats.kept_positions = stats.positions_by_layer[last]
        stats.mean_visual_per_layer = per_layer.mean(0).tolist()
        self._set_stats(stats)
        loss = self._losses[-1] if self._losses else None
        if loss is not None and (fwd.base.version > 0 or fwd.layer_maps):  # the logits rows are these tokens
            loss.kept = stats.kept_positions
