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
=====================  ===========================================================================

The wrappers subclass lmms-eval's own classes (so prompts, image handling and decoding are exactly
lmms-eval's) and add one thing: ``vtprune.prune`` on the loaded model. ``--model_args`` takes the parent's
arguments plus ``method=``, ``ratio=`` / ``keep=``, ``layer=``, ``budget=``, ``positions=`` and the method's
own fields (``lam=0.5`` for mmr, ``seed=1`` for random; lists as ``layer=[7,9,12]`` or ``layer=7;9;12``).
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
import json
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from vtprune.api import POSITIONS, PruneHandle, prune
from vtprune.api import method as build_method
from vtprune.bench.timing import PrefillClock
from vtprune.budget import check_policy
from vtprune.methods.base import Method
from vtprune import spec
from vtprune.registry import METHODS

#: model_args that configure pruning rather than the model (a method's own fields come on top).
PRUNE_KEYS: tuple[str, ...] = ("method", "budget", "positions")
#: Arguments lmms-eval itself passes to every model constructor.
FRAMEWORK_KEYS: tuple[str, ...] = ("batch_size", "max_batch_size", "device")
_BASELINE_NAMES = {"", "none", "null", "baseline"}
_BUDGET_FIELDS = ("ratio", "keep", "layer")
# Method fields that are objects, not options: filled in from the loaded model where they exist.
_INTERNAL_FIELDS = {"tokenizer"}


# ============================================================================ model_args
@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """One pruning configuration: a validated method object (None = unpruned) and the span policy."""

    method: Method | None = None
    budget: str = "per_frame"
    positions: str = "original"

    @property
    def method_label(self) -> str:
        """``"none"``, ``"kcenter"``, or ``"fastv(layer=3)"`` when options differ from the defaults."""
        m = self.method
        if m is None:
            return "none"
        try:
            defaults = type(m)().to_dict()
        except (TypeError, ValueError):
            defaults = {}
        opts = {k: v for k, v in m.to_dict().items()
                if k not in ("method", "version", "ratio", "keep") and defaults.get(k, object()) != v}
        extra = [f"budget={self.budget}"] if self.budget != "per_frame" else []
        extra += [f"positions={self.positions}"] if self.positions != "original" else []
        inner = ", ".join([f"{k}={v}" for k, v in opts.items()] + extra)
        return f"{m.name}({inner})" if inner else m.name

    @property
    def budget_label(self) -> str:
        """``"ratio=0.75"``, ``"keep=64"`` or ``"-"`` (unpruned)."""
        m = self.method
        if m is None:
            return "-"
        return f"keep={m.keep}" if m.keep is not None else f"ratio={m.ratio:g}"

    @property
    def label(self) -> str:
        return "baseline" if self.method is None else f"{self.method_label} {self.budget_label}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": None if self.method is None else self.method.to_dict(), "budget": self.budget,
                "positions": self.positions}


def method_options(name: str) -> dict[str, str]:
    """The options of method ``name`` settable from model_args: field name -> annotation."""
    return {k: v for k, v in spec.fields(name).items() if k not in _INTERNAL_FIELDS}


def parse_model_args(kwargs: dict[str, Any], *, allowed: Collection[str] | None,
                     owner: str = "vtprune") -> tuple[PruneConfig, dict[str, Any]]:
    """Split model_args into a validated :class:`PruneConfig` and the rest (for the model constructor).

    Args:
        kwargs: the parsed ``--model_args`` (plus lmms-eval's ``batch_size`` / ``device``).
        allowed: argument names the model constructor accepts (None: accept everything).
        owner: the model id, for error messages.

    Raises:
        ValueError: an unknown method (with "did you mean"), an invalid option value, a budget without
            a method or a method without a budget, or arguments neither pruning nor the model knows.
    """
    kw = dict(kwargs)
    name = kw.pop("method", None)
    budget = kw.pop("budget", "per_frame")
    positions = kw.pop("positions", "original")
    try:
        check_policy(budget)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None
    if positions not in POSITIONS:
        raise ValueError(f"{owner}: positions={positions!r} is not allowed; allowed: {', '.join(POSITIONS)}")

    method_kw: dict[str, Any] = {}
    options: dict[str, str] = {}
    if name is None or str(name).strip().lower() in _BASELINE_NAMES:
        name = None
        stray = [k for k in _BUDGET_FIELDS if k in kw]
        if stray:
            raise ValueError(
                f"{owner}: {', '.join(stray)} given without method=; name a method (one of "
                f"{', '.join(METHODS.names())}) or drop them for the unpruned baseline"
            )
    else:
        try:
            options = method_options(str(name))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{owner}: {exc.args[0] if exc.args else exc}") from None
        for key in [k for k in kw if k in options]:
            try:
                method_kw[key] = spec.coerce(key, kw.pop(key), options[key])
            except ValueError as exc:
                raise ValueError(f"{owner}: {key}: {exc}") from None

    rest: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in kw.items():
        if allowed is None or key in allowed or key in FRAMEWORK_KEYS:
            rest[key] = value
        else:
            unknown.append(key)
    if unknown:
        model_part = sorted(set(allowed or ()) - {"self"})
        parts = [f"model: {', '.join(model_part)}"] if model_part else []
        parts.append(f"pruning: {', '.join(PRUNE_KEYS)}")
        parts.append(f"method {name!r}: {', '.join(options)}" if name else
                     "method options (ratio, keep, layer, ...) once method= is given")
        bad = ", ".join(map(repr, unknown))
        what = "model_args" if model_part else "option(s)"
        raise ValueError(f"{owner}: unknown {what} {bad}; allowed: {'; '.join(parts)}")

    method_obj = None
    if name is not None:
        try:
            method_obj = build_method(str(name), **method_kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{owner}: {exc}") from None
        if method_obj.ratio is None and method_obj.keep is None:
            raise ValueError(
                f"{owner}: method={name!r} needs a budget: ratio=R (fraction of visual tokens removed, "
                "in [0, 1)) or keep=K (visual tokens kept per span)"
            )
    return PruneConfig(method_obj, budget, positions), rest


def _init_params(cls: type) -> set[str] | None:
    """Named parameters of ``cls.__init__`` (None if it cannot be inspected)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    return {p.name for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


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
            self._vt_handle = prune(model, m, budget=config.budget, positions=config.positions)
        self._vt_clock = PrefillClock(model, on_start=self._vt_stats, on_stop=self._vt_record)
        self._vt_config = config
        self.reset_records()
        return self._vt_handle

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
        with self._vt_reading():
            return super().generate_until(requests)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        with self._vt_reading(dedupe=True):  # parents read a doc twice (target, then visuals)
            return super().loglikelihood(requests)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
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
            for r, (task, split, doc_id) in enumerate(docs):
                self._vt_records.append({"task": task, "split": split, "doc_id": doc_id, **common,
                                         "prompt_tokens": prompt[r], "visual_before": before[r],
                                         "visual_after": after[r],
                                         "mean_visual_per_layer": per_layer[r]})
        else:  # e.g. beam search (rows = docs x beams): the batch means, attributed to every doc
            mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
            for task, split, doc_id in docs or [(None, None, None)]:
                self._vt_records.append({"task": task, "split": split, "doc_id": doc_id, **common,
                                         "prompt_tokens": mean(prompt), "visual_before": mean(before),
                                         "visual_after": mean(after),
                                         "mean_visual_per_layer": mean(per_layer)})

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


# ============================================================================ generic model
def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    out: list[Any] = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _resolve_dtype(dtype: Any) -> Any:
    if dtype in (None, "auto") or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. float32, bfloat16, float16, auto)")
    return value


class HFVisionLanguageModel(lmms):
    """A plain lmms-eval model for any HF VLM loadable with its ``AutoProcessor`` (pruning comes from
    :class:`VTPruneHF`). Images only; videos need the wrapped lmms-eval classes.

    Args:
        pretrained: a local directory (or hub id) with the model and its processor.
        device: "cpu", "cuda", "cuda:1"...; default: cuda if available. Ignored under ``accelerate
            launch`` (each process takes its own GPU) and with ``device_map``.
        device_map: e.g. "auto" to split a large model over the visible GPUs (single process).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16".
        batch_size: prompts per ``generate`` call (left padded).
        attn_implementation: "sdpa" (default of transformers), "eager", "flash_attention_2".
        max_new_tokens: used when a task's ``generation_kwargs`` does not set it.
        use_chat_template: render prompts with the processor's chat template when it has one; else
            ``<image>\\n`` placeholders are prepended to the task's text.
        system_prompt: an optional system message (chat template only).
        max_batch_size: accepted because lmms-eval passes it to every model; unused.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        device_map: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = 128,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        import transformers
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            if device_map:
                raise ValueError("device_map (one model split over GPUs) and `accelerate launch` data "
                                 "parallelism are exclusive: use one process with device_map=auto")
            self._device = accelerator.device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        self.batch_size_per_gpu = 1 if str(batch_size) == "auto" else int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.use_chat_template = bool(use_chat_template)
        self.system_prompt = system_prompt
        self.pretrained = pretrained

        load: dict[str, Any] = {"dtype": _resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        if device_map:
            load["device_map"] = device_map
        config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        archs = [a for a in (getattr(config, "architectures", None) or []) if hasattr(transformers, a)]
        model_cls = getattr(transformers, archs[0]) if archs else transformers.AutoModelForImageTextToText
        self._model = model_cls.from_pretrained(pretrained, **load).eval()
        if not device_map:
            self._model.to(self._device)
        self.processor = transformers.AutoProcessor.from_pretrained(pretrained,
                                                                    trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"  # every row must end where its answer starts

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the embedding table's device (differs from ``device`` under a device_map)."""
        return self._model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ prompts
    def build_prompt(self, context: str, n_images: int) -> str:
        """The model's prompt for ``context`` with ``n_images`` images before it."""
        image_token = getattr(self.processor, "image_token", None)
        if image_token and image_token in context:
            n_images = 0  # the task placed its own placeholders
        template = (getattr(self.processor, "chat_template", None)
                    or getattr(self.tokenizer, "chat_template", None))
        if self.use_chat_template and template:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
            messages = [{"role": "user", "content": content}]
            if self.system_prompt:
                system = [{"type": "text", "text": self.system_prompt}]
                messages.insert(0, {"role": "system", "content": system})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if n_images and not image_token:
            raise ValueError(f"{type(self).__name__}: the processor has neither a chat template nor an "
                             "image_token; cannot place the images in the prompt")
        return f"{image_token}\n" * n_images + context

    def encode(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        """Processor outputs on the input device, floating tensors in the model's dtype."""
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        batch = self.processor(**kwargs)
        dev, dtype = self.input_device, self._model.dtype
        out: dict[str, Any] = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev, dtype) if v.is_floating_point() else v.to(dev)
            out[k] = v
        return out

    @staticmethod
    def _images(visuals: Any, owner: str) -> list[Any]:
        flat = _flatten(visuals)
        if any(isinstance(v, (str, dict)) for v in flat):
            raise NotImplementedError(f"{owner}: video / audio inputs are not supported by the generic "
                                      "model; use vtprune_llava_hf or vtprune_qwen*_vl (lmms-eval's loaders)")
        return [v.convert("RGB") if hasattr(v, "convert") else v for v in flat]

    # ------------------------------------------------------------------ requests
    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Group by task and generation settings, docs in order: batches are deterministic and match a
        # direct evaluation that walks the same docs with the same batch size.
        groups: dict[tuple[str, str], list[int]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs, _, doc_id, task, _ = req.args
            groups.setdefault((task, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
        out: list[str] = [""] * len(requests)
        setting = getattr(getattr(self, "prune_config", None), "label", "")
        desc = f"{getattr(self, 'model_id', 'hf')} [{setting}]"
        bar = tqdm(total=len(requests), desc=desc, disable=self.rank != 0, leave=False)
        for idx in groups.values():
            idx.sort(key=lambda i: requests[i].args[3])
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                texts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    doc = self.task_dict[task][split][doc_id]
                    imgs = self._images(doc_to_visual(doc), type(self).__name__)
                    texts.append(self.build_prompt(context, len(imgs)))
                    images.extend(imgs)
                gen_kwargs = dict(requests[chunk[0]].args[1])
                for i, text in zip(chunk, self._generate(texts, images, gen_kwargs), strict=True):
                    out[i] = text
                    context, kwargs = requests[i].args[:2]
                    self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                bar.update(len(chunk))
        bar.close()
        return out

    @torch.inference_mode()
    def _generate(self, texts: list[str], images: list[Any], gen_kwargs: dict[str, Any]) -> list[str]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        tok = self.tokenizer
        args: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            "do_sample": temperature > 0,  # lmms-eval tasks ask for greedy decoding with temperature 0
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
        if args["do_sample"]:
            args["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                args["top_p"] = float(gen_kwargs["top_p"])
        inputs = self.encode(texts, images)
        seq = self._model.generate(**inputs, **args)
        decoded = tok.batch_decode(seq[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        result = []
        for text in decoded:
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            result.append(text.strip())
        return result

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        res = []
        for req in tqdm(requests, desc="loglikelihood", disable=self.rank != 0, leave=False):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            cont = continuation if isinstance(continuation, str) else continuation(doc)
            images = self._images(doc_to_visual(doc), type(self).__name__)
            prompt = self.build_prompt(context, len(images))
            n_prompt = self.encode([prompt], images)["input_ids"].shape[1]
            inputs = self.encode([prompt + cont], images)
            ids = inputs["input_ids"][0]
            n_cont = ids.shape[0] - n_prompt
            if n_cont <= 0:
                res.append((0.0, True))
                continue
            # Pruned models return logits for kept positions only; the continuation is text at the end
            # of the sequence, which is never dropped, so counting from the end stays exact.
            logits = self._model(**inputs).logits[0, -n_cont - 1:-1].float()
            target = ids[-n_cont:].to(logits.device)
            logp = torch.log_softmax(logits, dim=-1)
            greedy = bool((logp.argmax(-1) == target).all())
            res.append((float(logp.gather(-1, target[:, None]).sum()), greedy))
        return res

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not support multi-round generation")


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
}


def wrap(parent: type, name: str | None = None, model_id: str | None = None) -> type:
    """``class <name>(PruningMixin, parent)``: any lmms-eval model class that keeps its HF model in
    ``self.model``, with pruning, per-sample records and a model-keeping ``clean()``."""
    name = name or f"VTPrune{parent.__name__}"
    doc = (f"lmms-eval's ``{parent.__module__}.{parent.__name__}`` with vtprune pruning: model_args are the "
           f"parent's plus method=, ratio= / keep=, layer=, budget=, positions= and the method's options.")
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

