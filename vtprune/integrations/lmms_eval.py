"""lmms-eval model classes that prune visual tokens with any vtprune method.

Registered through the ``lmms_eval.models`` entry point (:mod:`vtprune.integrations.manifest`):

=====================  ===========================================================================
model id               class
=====================  ===========================================================================
``vtprune``            :class:`VTPruneHF`: any supported HF VLM whose processor renders its prompt
                       (chat template, or ``<image>`` placeholders); batched, offline-friendly
``vtprune_llava_hf``   lmms-eval's ``llava_hf`` (LLaVA-1.5 / NeXT / OneVision HF checkpoints)
``vtprune_qwen2_vl``   lmms-eval's ``qwen2_vl``; ``vtprune_qwen2_5_vl`` / ``vtprune_qwen3_vl`` alike
``vtprune_internvl_hf``  lmms-eval's ``internvl_hf`` (chat interface)
``vtprune_mistral3_vl``  lmms-eval's ``mistral3_vl`` (Mistral-Small-3.1 / 3.2, Ministral-3 HF checkpoints)
``vtprune_glm4v``      lmms-eval's ``glm4v`` (GLM-4.1V HF checkpoints)
``vtprune_gemma4``     lmms-eval's ``gemma4`` (Gemma-4 HF checkpoints)
=====================  ===========================================================================

The wrappers subclass lmms-eval's own classes (so prompts, image handling and decoding are exactly
lmms-eval's) and add one thing: ``vtprune.prune`` on the loaded model. ``--model_args`` takes the parent's
arguments plus ``method=``, ``ratio=`` / ``keep=``, ``layer=``, ``budget=``, ``positions=``, ``newlines=`` and the
method's own fields (``lam=0.5`` for mmr, ``seed=1`` for random; lists as ``layer=[7,9,12]`` or ``layer=7;9;12``).
They are split off and validated through :func:`vtprune.method` BEFORE the parent constructor runs (a
checkpoint is never loaded for a typo); anything neither side knows is an error naming the allowed
arguments. ``method=none`` (or no ``method``) evaluates the unpruned model.

Per sample, every model records the prefill time (vision tower + pruning + LLM prefill, CUDA-synchronised)
and the visual tokens before / after pruning: see :meth:`PruningMixin.sample_records`. ``clean()``, which
lmms-eval calls after every evaluation, keeps the model loaded, and :meth:`PruningMixin.configure` swaps
the pruning configuration, so one loaded model serves a whole sweep (``vtprune.eval_runner``).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import importlib
import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from lmms_eval.api.instance import Instance

from vtprune.api import PruneHandle, prune
from vtprune.bench.timing import PrefillClock

from vtprune.integrations.hf_model import HFVisionLanguageModel, _flatten
from vtprune.integrations.model_args import (
    PruneConfig,
    _init_params,
    method_options,
    parse_model_args,
)


# ============================================================================ doc tap
class _DocsTap:
    """A split of a task's dataset that notes which documents the model reads, in order."""

    def __init__(self, task: str, split: str, docs: Any, sink: collections.deque, dedupe: bool) -> None:
        self._task, self._split, self._docs, self._sink, self._dedupe = task, split, docs, sink, dedupe

    def __getitem__(self, doc_id: Any) -> Any:
        if isinstance(doc_id, int):
            key = (self._task, self._split, doc_id)
            if not (self._dedupe and self._sink and self._sink[-1] == key):
                self._sink.append(key)
        return self._docs[doc_id]

    def __len__(self) -> int:
        return len(self._docs)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._docs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._docs, name)


class _SplitsTap(collections.abc.Mapping):
    def __init__(self, task: str, splits: Any, sink: collections.deque, dedupe: bool) -> None:
        self._task, self._splits, self._sink, self._dedupe = task, splits, sink, dedupe

    def __getitem__(self, split: str) -> _DocsTap:
        return _DocsTap(self._task, split, self._splits[split], self._sink, self._dedupe)

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)


class _TaskDictTap(collections.abc.Mapping):
    """Stands in for ``lm.task_dict`` while the model answers requests. Every lmms-eval model reads its
    documents as ``self.task_dict[task][split][doc_id]`` right before building a batch, so the order of
    those reads tells which prefill belongs to which document without touching the parent's code."""

    def __init__(self, task_dict: dict, sink: collections.deque, dedupe: bool) -> None:
        self._d, self._sink, self._dedupe = task_dict, sink, dedupe

    def __getitem__(self, task: str) -> _SplitsTap:
        return _SplitsTap(task, self._d[task], self._sink, self._dedupe)

    def __setitem__(self, task: str, value: Any) -> None:
        self._d[task] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


# ============================================================================ the mixin
class PruningMixin:
    """Adds vtprune pruning and per-sample prefill records to an lmms-eval model class.

    Put it first among the bases: ``class X(PruningMixin, SomeLmmsModel)``. The parent must expose the
    loaded HF model as ``self.model``.
    """

    model_id: ClassVar[str] = "vtprune"

    def __init__(self, **kwargs: Any) -> None:
        parent = _parent_after(type(self), PruningMixin)
        config, rest = parse_model_args(kwargs, allowed=_init_params(parent), owner=self.model_id)
        if "max_batch_size" in rest and "max_batch_size" not in (_init_params(parent) or {"max_batch_size"}):
            rest.pop("max_batch_size")  # lmms-eval passes it to every class; most parents reject it
        super().__init__(**_device_map_shim(parent, rest))
        self._vt_handle: PruneHandle | None = None
        self._vt_clock: PrefillClock | None = None
        self._vt_pending: collections.deque = collections.deque()
        self._vt_records: list[dict[str, Any]] = []
        self._vt_config = PruneConfig()
        self._vt_overlays: Overlays | None = None
        self.configure(config)

    # ------------------------------------------------------------------ configuration
    @property
    def prune_config(self) -> PruneConfig:
        """The active pruning configuration."""
        return self._vt_config

    @property
    def prune_handle(self) -> PruneHandle | None:
        """The active :class:`vtprune.PruneHandle` (None when unpruned)."""
        return self._vt_handle

    def configure(self, config: PruneConfig | str | None = None, **options: Any) -> PruneHandle | None:
        """Switch pruning on the loaded model: ``configure("kcenter", ratio=0.75)``, ``configure(None)``
        for the unpruned model, or a :class:`PruneConfig`. Clears the per-sample records."""
        if not isinstance(config, PruneConfig):
            args = dict(options)
            if config is not None:
                args["method"] = config
            config, _ = parse_model_args(args, allowed=(), owner=f"{self.model_id}.configure")
        elif options:
            raise TypeError("configure(PruneConfig) takes no further options")
        self._vt_detach()
        model = self.model
        if config.method is not None:
            m = config.method
            if any(f.name == "tokenizer" for f in dataclasses.fields(m)) and m.tokenizer is None:
                tok = self._vt_tokenizer()
                if tok is not None:  # MMTok-style keyword instructions need the model's tokenizer
                    m = dataclasses.replace(m, tokenizer=tok)
            self._vt_handle = prune(model, m, budget=config.budget, positions=config.positions,
                                    newlines=config.newlines)
        self._vt_clock = PrefillClock(model, on_start=self._vt_stats, on_stop=self._vt_record)
        self._vt_config = config
        self.reset_records()
        if self._vt_overlays is not None:
            self._vt_overlays.drawn.clear()
        return self._vt_handle

    def save_overlays(self, root: str | Path | None, n: int = 0) -> None:
        """From now on, draw the kept tokens of the first ``n`` documents of every task under each pruned setting
        into ``root/overlays/<setting>/<task>-<doc_id>.png`` (a record's ``overlay`` names it, relative to
        ``root``); ``None`` or ``n=0`` stops. A video is drawn as a strip of frames re-read uniformly from its
        file (the parent class's own sampler may pick slightly different frames)."""
        self._vt_overlays = Overlays(Path(root), n) if root is not None and n > 0 else None

    def _vt_detach(self) -> None:
        if self._vt_clock is not None:
            self._vt_clock.remove()
            self._vt_clock = None
        if self._vt_handle is not None:
            self._vt_handle.remove()
            self._vt_handle = None

    def _vt_tokenizer(self) -> Any:
        for owner, attr in ((self, "tokenizer"), (getattr(self, "processor", None), "tokenizer")):
            try:
                tok = getattr(owner, attr, None)
            except Exception:  # noqa: BLE001 - some parents' properties raise before set-up
                tok = None
            if tok is not None:
                return tok
        return None

    # ------------------------------------------------------------------ lmms-eval hooks
    def generate_until(self, requests: list[Instance]) -> list[Any]:
        self._vt_note_visuals(requests)
        with self._vt_reading():
            return super().generate_until(requests)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        self._vt_note_visuals(requests)
        with self._vt_reading(dedupe=True):  # parents read a doc twice (target, then visuals)
            return super().loglikelihood(requests)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        self._vt_note_visuals(requests)
        with self._vt_reading():
            return super().generate_until_multi_round(requests)

    def clean(self) -> None:
        """Free cached memory but keep the model: lmms-eval's default ``clean()`` deletes every
        ``nn.Module`` attribute after an evaluation, which would end a sweep after its first setting.
        Call :meth:`release` to really drop the model."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def release(self) -> None:
        """Undo pruning and hooks, then drop the model (lmms-eval's original ``clean()``)."""
        self._vt_detach()
        super().clean()

    @contextmanager
    def _vt_reading(self, dedupe: bool = False) -> Iterator[None]:
        saved = self.task_dict
        self.task_dict = _TaskDictTap(saved, self._vt_pending, dedupe)
        try:
            yield
        finally:
            self.task_dict = saved
            self._vt_pending.clear()

    # ------------------------------------------------------------------ prefill records
    def reset_records(self) -> None:
        self._vt_records = []
        self._vt_pending.clear()

    def sample_records(self) -> list[dict[str, Any]]:
        """One dict per prefill row since the last :meth:`configure` / :meth:`reset_records`:
        ``task, split, doc_id`` (None if the row could not be matched to a document), ``prefill_ms`` (of
        the whole batch the row was in), ``batch_rows``, ``visual_before``, ``visual_after`` (visual
        tokens reaching the last decoder layer), ``mean_visual_per_layer``, ``select_ms`` and
        ``prompt_tokens`` (the unpadded prompt length, placeholders included)."""
        return list(self._vt_records)

    def _vt_stats(self) -> Any:
        # the handle's stats object when a prefill starts: a new one after it means this prefill pruned
        return self._vt_handle.stats if self._vt_handle is not None else None

    def _vt_record(self, ms: float, kwargs: dict, stats_before: Any) -> None:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            return
        rows = ref.shape[0]
        h = self._vt_handle
        st = h.stats if h is not None else None
        if st is not None and st is not stats_before and len(st.visual_before) == rows:
            before, after = list(st.visual_before), list(st.visual_after)
            per_layer, select_ms = [float(x) for x in st.mean_visual_per_layer], float(st.select_ms)
        else:  # unpruned, or a prompt without images: count the placeholders
            before = self._vt_placeholders(ids, mask, rows)
            after, per_layer, select_ms = list(before), [float(x) for x in before], 0.0
        prompt = _prompt_lengths(ids, mask, rows)
        docs = [self._vt_pending.popleft() for _ in range(min(rows, len(self._vt_pending)))]
        common = {"prefill_ms": ms, "batch_rows": rows, "select_ms": select_ms}
        if len(docs) == rows:
            drawn = self._vt_draw(docs, st) if st is not None and st is not stats_before else {}
            for r, (task, split, doc_id) in enumerate(docs):
                self._vt_records.append({"task": task, "split": split, "doc_id": doc_id, **common,
                                         "prompt_tokens": prompt[r], "visual_before": before[r],
                                         "visual_after": after[r],
                                         "mean_visual_per_layer": per_layer[r], "overlay": drawn.get(r)})
        else:  # e.g. beam search (rows = docs x beams): the batch means, attributed to every doc
            mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
            for task, split, doc_id in docs or [(None, None, None)]:
                self._vt_records.append({"task": task, "split": split, "doc_id": doc_id, **common,
                                         "prompt_tokens": mean(prompt), "visual_before": mean(before),
                                         "visual_after": mean(after),
                                         "mean_visual_per_layer": mean(per_layer)})

    # ------------------------------------------------------------------ overlays
    def _vt_note_visuals(self, requests: list[Instance]) -> None:
        """The pictures of the documents an overlay will be drawn for (read before the doc tap is installed)."""
        ov = self._vt_overlays
        if ov is None or self._vt_handle is None:
            return
        for req in requests:
            doc_to_visual, doc_id, task, split = req.args[2:6]
            key = (task, split, doc_id)
            if key in ov.pictures or ov.drawn.get(task, 0) + len(
                    [k for k in ov.pictures if k[0] == task]) >= ov.n or not callable(doc_to_visual):
                continue
            try:
                ov.pictures[key] = doc_to_visual(self.task_dict[task][split][doc_id])
            except Exception as exc:  # noqa: BLE001 - an overlay never fails an evaluation
                ov.warn(f"cannot read the visuals of {task} doc {doc_id}: {exc}")

    def _vt_draw(self, docs: list[tuple[Any, Any, Any]], stats: Any) -> dict[int, str]:
        """Overlays of the rows whose pictures were noted: row -> path relative to the overlay root."""
        ov = self._vt_overlays
        if ov is None or not ov.pictures or self._vt_handle is None:
            return {}
        from vtprune.masks import kept_masks

        masks, out = None, {}
        for r, key in enumerate(docs):
            visuals = ov.pictures.pop(key, None)
            if visuals is None or ov.drawn.get(key[0], 0) >= ov.n:
                continue
            masks = kept_masks(stats) if masks is None else masks
            images = [im for im in masks if im.row == r]
            try:
                out[r] = ov.draw(self._vt_config.label, key, images, visuals, self._vt_handle.adapter,
                                 getattr(self, "processor", None) or getattr(self, "_image_processor", None))
                ov.drawn[key[0]] = ov.drawn.get(key[0], 0) + 1
            except Exception as exc:  # noqa: BLE001
                ov.warn(f"no overlay for {key[0]} doc {key[2]}: {exc}")
        return out

    def _vt_placeholders(self, ids: torch.Tensor | None, mask: torch.Tensor | None, rows: int) -> list[int]:
        if ids is None:
            return [0] * rows
        cfg = self.model.config
        tokens = {v for k in ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
                  if isinstance(v := getattr(cfg, k, None), int)}
        if not tokens:
            return [0] * rows
        hit = torch.isin(ids, torch.tensor(sorted(tokens), device=ids.device))
        if mask is not None and mask.dim() == 2 and mask.shape == ids.shape:
            hit &= mask.bool()
        return hit.sum(1).tolist()


@dataclasses.dataclass
class Overlays:
    """Where and how many overlays a sweep draws, and the pictures of the documents in flight."""

    root: Path
    n: int
    drawn: dict[str, int] = dataclasses.field(default_factory=dict)  # task -> overlays drawn this setting
    pictures: dict[tuple[Any, Any, Any], Any] = dataclasses.field(default_factory=dict)
    warned: bool = False

    def warn(self, message: str) -> None:
        if not self.warned:
            warnings.warn(f"vtprune overlays: {message}", stacklevel=3)
            self.warned = True

    def draw(self, setting: str, key: tuple[Any, Any, Any], images: list[Any], visuals: Any, adapter: Any,
             processor: Any) -> str:
        from vtprune.show import Entry, figure

        task, _, doc_id = key
        flat = _flatten(visuals)
        entries = []
        for i, im in enumerate(images):
            v = flat[min(i, len(flat) - 1)] if flat else None
            pictures = _video_frames(v, im.frames) if isinstance(v, (str, os.PathLike, dict)) else [v]
            entries.append(Entry(setting + (f" · image {i}" if len(images) > 1 else ""), im, pictures=pictures))
        rel = Path("overlays") / _safe(setting) / f"{_safe(str(task))}-{_safe(str(doc_id))}.png"
        figure(entries[0].pictures, entries, adapter, self.root / rel, processor=processor,
               title=f"{task} doc {doc_id}", height=112 if any(e.tokens.frames > 1 for e in entries) else 160)
        return rel.as_posix()


def _video_frames(video: Any, frames: int) -> list[Any]:
    """``frames`` pictures spread uniformly over a video file (the frames an overlay is drawn on)."""
    from vtprune.video import load_video

    path = video.get("path") if isinstance(video, dict) else video
    return load_video(path, num_frames=frames).pil()


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in text)[:120]


def _prompt_lengths(ids: torch.Tensor | None, mask: torch.Tensor | None, rows: int) -> list[int]:
    """Unpadded prompt tokens per row (placeholders included)."""
    if mask is not None and mask.dim() == 2:
        return mask.sum(1).tolist()
    return [int(ids.shape[1])] * rows if ids is not None else [0] * rows


def _device_map_shim(parent: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Some lmms-eval classes (llava_hf) default to ``device_map=""`` and pass it to ``from_pretrained``,
    which transformers 5 rejects. In a single process, use the device instead; under ``accelerate launch``
    keep "" (the parent reads it as "data parallel" and picks ``cuda:<local rank>`` itself)."""
    try:
        default = inspect.signature(parent.__init__).parameters["device_map"].default
    except (KeyError, TypeError, ValueError):
        return kwargs
    if default == "" and not kwargs.get("device_map") and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        device = kwargs.get("device") or inspect.signature(parent.__init__).parameters["device"].default
        return {**kwargs, "device_map": str(device)}
    return kwargs


def _parent_after(cls: type, mixin: type) -> type:
    """The first class after ``mixin`` in ``cls``'s MRO that defines ``__init__``."""
    mro = cls.__mro__
    for c in mro[mro.index(mixin) + 1:]:
        if "__init__" in c.__dict__:
            return c
    return object


class VTPruneHF(PruningMixin, HFVisionLanguageModel):
    """``--model vtprune``: :class:`HFVisionLanguageModel` with vtprune pruning (see module docstring)."""

    model_id = "vtprune"


# ============================================================================ wrapped lmms-eval classes
#: class name -> (lmms-eval module, parent class, model id). Built on first access: the parents' modules
#: import decord / qwen-vl-utils at module top, which only runs that want them should need.
WRAPPED: dict[str, tuple[str, str, str]] = {
    "VTPruneLlavaHf": ("lmms_eval.models.simple.llava_hf", "LlavaHf", "vtprune_llava_hf"),
    "VTPruneLlavaHfChat": ("lmms_eval.models.chat.llava_hf", "LlavaHf", "vtprune_llava_hf"),
    "VTPruneQwen2VL": ("lmms_eval.models.simple.qwen2_vl", "Qwen2_VL", "vtprune_qwen2_vl"),
    "VTPruneQwen2_5VL": ("lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VL", "vtprune_qwen2_5_vl"),
    "VTPruneQwen2_5VLChat": ("lmms_eval.models.chat.qwen2_5_vl", "Qwen2_5_VL", "vtprune_qwen2_5_vl"),
    "VTPruneQwen3VL": ("lmms_eval.models.simple.qwen3_vl", "Qwen3_VL", "vtprune_qwen3_vl"),
    "VTPruneQwen3VLChat": ("lmms_eval.models.chat.qwen3_vl", "Qwen3_VL", "vtprune_qwen3_vl"),
    "VTPruneInternVLHf": ("lmms_eval.models.chat.internvl_hf", "InternVLHf", "vtprune_internvl_hf"),
    "VTPruneMistral3VL": ("lmms_eval.models.simple.mistral3_vl", "Mistral3_VL", "vtprune_mistral3_vl"),
    "VTPruneGlm4v": ("lmms_eval.models.simple.glm4v", "GLM4V", "vtprune_glm4v"),
    "VTPruneGemma4": ("lmms_eval.models.simple.gemma4", "Gemma4", "vtprune_gemma4"),
}


def wrap(parent: type, name: str | None = None, model_id: str | None = None) -> type:
    """``class <name>(PruningMixin, parent)``: any lmms-eval model class that keeps its HF model in
    ``self.model``, with pruning, per-sample records and a model-keeping ``clean()``."""
    name = name or f"VTPrune{parent.__name__}"
    doc = (f"lmms-eval's ``{parent.__module__}.{parent.__name__}`` with vtprune pruning: model_args are the "
           f"parent's plus method=, ratio= / keep=, layer=, budget=, positions=, newlines= and the method's options.")
    return type(name, (PruningMixin, parent), {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                                                "model_id": model_id or name.lower()})


def model_class(model_id: str, *, chat: bool = False) -> type:
    """The class registered as ``model_id`` (works without the entry point installed)."""
    from vtprune.integrations.manifest import MODELS

    if model_id not in MODELS:
        raise ValueError(f"unknown vtprune model {model_id!r}; known: {', '.join(MODELS)}")
    simple, chat_name = MODELS[model_id]
    name = (chat_name or simple) if chat else (simple or chat_name)
    return globals()[name] if name in globals() else __getattr__(name)


def __getattr__(name: str) -> Any:
    if name in WRAPPED:
        module_name, parent_name, model_id = WRAPPED[name]
        module = importlib.import_module(module_name)
        if getattr(module, "_has_qwen_vl", True) is False:  # lmms-eval imports it optionally, then fails late
            raise ImportError(
                f"{model_id} wraps lmms-eval's {parent_name}, which needs qwen-vl-utils (and so torchvision, "
                "matching your torch): pip install qwen-vl-utils torchvision. Without them, evaluate the "
                "same checkpoint with the generic class: --model vtprune"
            )
        cls = wrap(getattr(module, parent_name), name, model_id)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PruneConfig", "PruningMixin", "HFVisionLanguageModel", "VTPruneHF", "parse_model_args",
           "method_options", "wrap", "model_class", *WRAPPED]

