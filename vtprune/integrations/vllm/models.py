"""What vLLM's model classes with vtprune's pruning share (the classes themselves: :mod:`.models_llava`,
:mod:`.models_qwen`, :mod:`.models_internvl`, registered for the architectures the plugin covers).

Each subclasses vLLM's own class and behaves exactly like it unless the model config carries a vtprune plan
(``additional_config={"vtprune": ...}``, checked at engine start). With one:

* the prompt processor gives each image the placeholder count its budget keeps (known from the image's size);
* ``embed_multimodal`` runs vLLM's encoder path with vtprune's captures, then the plan's steps
  (:class:`~vtprune.integrations.vllm.host.VllmHost`), and returns each image's kept rows, with the kept
  tokens' original offsets in extra columns when positions are original;
* ``get_mrope_input_positions`` / ``recompute_mrope_positions`` place text as if unpruned and every kept token
  at its original position (:mod:`~vtprune.integrations.vllm.positions`).

These modules import vLLM; the plugin's entry point registers the classes by name, so importing vtprune never does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from vtprune.integrations.vllm.config import Plan, plan_of
from vtprune.integrations.vllm.host import VllmHost
from vtprune.integrations.vllm.runner import enable_pruning_path
from vtprune.patching import Patcher

_PLANS: dict[int, tuple[Any, Plan | None]] = {}


def _plan(hf_config: Any, architecture: str) -> Plan | None:
    """The plan on a model config, parsed once per config object."""
    hit = _PLANS.get(id(hf_config))
    if hit is None or hit[0] is not hf_config:
        hit = (hf_config, plan_of(hf_config, architecture))
        _PLANS[id(hf_config)] = hit
    return hit[1]


def pruning_processor(factory: Callable[..., Any], architecture: str, frames: Callable[[Any, str, int], int],
                      token: Callable[[Any, str], int | None], blocks_are_images: bool = False) -> Any:
    """A processor factory whose processors give each media item the placeholder count its budget keeps.
    ``frames(out_mm_kwargs, modality, item)``: the item's frames (the spans of a per-frame budget) when they are
    one run of placeholders; ``token(hf_config, modality)``: the placeholder token (None: the replacement's single
    target token); ``blocks_are_images``: a video's frame blocks are images to the HF host (InternVL), each kept
    on its own whatever the budget."""

    def build(info: Any, dummy_inputs: Any, **kwargs: Any) -> Any:
        proc = factory(info, dummy_inputs, **kwargs)
        hf_config = info.get_hf_config()
        plan = _plan(hf_config, architecture)
        if plan is None:
            return proc
        original = proc._get_prompt_updates

        def updates(mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Sequence[Any]:
            out = []
            for u in original(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
                if not isinstance(u, PromptReplacement):
                    out.append(u)
                    continue
                tok = token(hf_config, u.modality)
                if tok is None and isinstance(u.target, list) and len(u.target) == 1:
                    tok = u.target[0]
                out.append(PromptReplacement(modality=u.modality, target=u.target, replacement=_shrunk(
                    u, plan, tok, lambda i, m=u.modality: frames(out_mm_kwargs, m, i), blocks_are_images,
                    lambda i, m=u.modality: plan.adapter.structural_tokens(out_mm_kwargs[m][i]))))
            return out

        Patcher().set_attr(proc, "_get_prompt_updates", updates, what="vtprune: pruned placeholder counts")
        return proc

    return build


def _shrunk(update: PromptReplacement, plan: Plan, token: int | None, frames_of: Callable[[int], int],
            blocks_are_images: bool = False,
            structural_of: Callable[[int], int] = lambda i: 0) -> Callable[[int], Any]:
    """The replacement of ``update`` with each run of ``token`` cut to its kept count: one run is the whole item
    (its frames the spans of a per-frame budget); several runs are its frames, each a block of the prompt of its
    own (Qwen3-VL's timestamped frames), so only a per-frame budget gives each its count before the encoder runs,
    unless the blocks are separate images to the HF host (InternVL's frames)."""

    def replacement(item: int) -> Any:
        full = update.replacement(item) if callable(update.replacement) else update.replacement
        seq = full.full if isinstance(full, PromptUpdateDetails) else full
        if not isinstance(seq, list) or token not in seq:
            raise NotImplementedError(f"vtprune: the {update.modality} placeholder of this model is not a run of "
                                      f"token {token}; the plugin cannot shrink it")
        runs = _runs(seq, token)
        if len(runs) == 1:
            counts = [plan.kept_item(runs[0][1], frames_of(item), structural_of(item))]
        elif plan.config.budget != "per_frame" and not blocks_are_images:
            raise ValueError(f"vtprune: budget={plan.config.budget!r} pools the {len(runs)} frames of this "
                             f"{update.modality}, which this model lays out as separate blocks of the prompt; "
                             "vLLM needs each block's token count before the encoder runs: use budget='per_frame'")
        else:
            counts = [plan.kept(n) for _, n in runs]
        out, at = [], 0
        for (start, n), k in zip(runs, counts):
            out += seq[at:start] + [token] * k
            at = start + n
        out += seq[at:]
        if isinstance(full, PromptUpdateDetails) and full.is_embed is not None:
            return PromptUpdateDetails.select_token_id(out, token)
        return out

    return replacement


def _media_runs(input_tokens: list[int], features: list[Any], token_of: Callable[[str], int | None],
                extent_of: Callable[[Any], int]) -> list[tuple[int, int, int]]:
    """``(offset, placeholders, extent)`` of every run of placeholder tokens of the prompt's media items (an image's
    run, or each frame block of a video), sorted: what :func:`positions.prompt_positions` lays out."""
    media = []
    for f in sorted(features, key=lambda f: f.mm_position.offset):
        start, length, token = f.mm_position.offset, f.mm_position.length, token_of(f.modality)
        for s, n in _runs(input_tokens[start : start + length], token):
            media.append((start + s, n, extent_of(f)))
    return media


def _runs(seq: list[int], token: int | None) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of ``token`` in ``seq``."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(seq):
        if t != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _host(model: torch.nn.Module, vllm_config: Any, architecture: str) -> VllmHost | None:
    hf_config = vllm_config.model_config.hf_config
    if _plan(hf_config, architecture) is None:
        return None
    host = VllmHost(plan_of(hf_config, architecture, model))
    if host.plan.original_positions:
        enable_pruning_path()
    return host
