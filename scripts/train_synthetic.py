#!/usr/bin/env python
"""Train the embedded synthetic-VQA LLaVA on CPU and ship it to ``models/synthetic-llava``.

    python scripts/train_synthetic.py                 # reproduces the shipped model (resumes if interrupted)
    python scripts/train_synthetic.py --fresh         # ignore an existing checkpoint

Two stages. **Vision** (``vision_steps``): only the ViT and projector train, on dense auxiliary losses whose labels come
free from the generator: a linear head on the projector output predicts, per patch, the colour, shape, (colour, shape)
pair and 3 x 3 region of the object covering it, and a head on the ViT [CLS] token of the feature layer predicts which
pairs are present (so [CLS]-attention pruning has a meaningful signal, as CLIP's [CLS] attends to objects). Shape is
the slow one: a patch's shape is only visible in the outline of the whole ~3 x 3-patch object, so its head is
up-weighted and trained on object patches only (a first model trained without this stage never got past chance on
shape: object-patch shape accuracy 0.33, which capped it at 0.43 held-out).

**LLM** (the rest): the ViT is frozen (the projector and patch heads keep training) and the whole model answers
questions. Each row is the sample's (balanced) question and answer, then 0-7 follow-up turns about the same image
("USER: q ASSISTANT: a </s>"): the 576 visual tokens dominate the cost, so extra answers are nearly free supervision.
Loss = cross-entropy on every answer word (and the ``</s>`` after it) + the patch losses + retrieval supervision.
A from-scratch LLM does not find the few object tokens among 576 on its own (EVAL_INFRA.md §5: the answer-prior
plateau), so the circuit a question needs is supervised on the first ``attn_heads`` heads, as -log attention mass:

* gather (``gather_layer``): the question's anchor word (``top-left`` in "what colour is the shape in the top-left ?",
  ``circle`` in "is there a red circle ?") attends to the question's content words (``red``, ``circle``);
* retrieve (``attn_layer``): the anchor attends to the patches of the objects the question is about;
* route (``route_layer``): the answer-predicting "ASSISTANT:" attends to the anchor.

What the retrieved tokens mean for the answer, counting included, is left to the LM loss. The heads and the
supervision are training-only: the shipped model is a stock ``LlavaForConditionalGeneration``.

Everything is seeded: row ``i`` of step ``s`` is ``make_sample(s * batch + i)`` (its follow-ups seeded by the
sample), so a resumed run sees the same data as an uninterrupted one. Checkpoints are safetensors + JSON (no pickle):
model, heads, AdamW state, step, RNG.
"""

from __future__ import annotations

import os

# Must precede the first torch import: spin-waiting OpenMP threads were measured 10x slower on 2 shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, fields, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from vtprune.synthetic import scenes  # noqa: E402
from vtprune.synthetic.eval import evaluate  # noqa: E402
from vtprune.synthetic.model import ModelSpec, build_model, canonical_llava_layout  # noqa: E402
from vtprune.synthetic.tokenizer import build_processor, prompt  # noqa: E402

IGNORE = -100


def keep_freed_memory() -> None:
    """Stop glibc from handing freed memory back to the kernel (no mmap for big blocks, no heap trimming).

    Every step allocates and frees GBs of activations (~600-token sequences). By default each big block is a fresh
    mmap whose pages the kernel must fault in and zero again; on the shared VM this was trained on that was over
    half of a step, in system time (4-6 s/step; 1.8 s/step with this, system time 17 s -> 0.3 s over 5 steps).
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


@dataclass
class TrainConfig:
    """Every knob of a run; the defaults reproduce the shipped model."""

    out: str = "models/synthetic-llava"
    ckpt_dir: str = "out/train_synthetic"
    steps: int = 3000
    batch_size: int = 24
    lr: float = 1.5e-3
    vision_lr: float = 3e-3  # peak learning rate of the vision stage
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 1.0  # per-patch colour / shape / pair / region heads
    shape_weight: float = 3.0  # extra weight of the shape head: shape needs context, colour a single patch
    cls_weight: float = 0.5  # [CLS] "which objects are present" head
    # Stage 1: the first `vision_steps` steps train only the ViT + projector (+ aux heads); the LLM stage follows,
    # with the ViT frozen when `freeze_vision` (the projector and the patch heads keep training).
    vision_steps: int = 1000
    freeze_vision: bool = True
    # Retrieval supervision (0 = off). At decoder layer `attn_layer` the first `attn_heads` heads of each question's
    # anchor word (the word naming what is asked about) must put their mass on that object's patches; at layer
    # `route_layer` the same heads of the answer-predicting "ASSISTANT:" must attend to the anchor.
    attn_weight: float = 1.0
    gather_layer: int = 0  # where the anchor word gathers the question's content words ("red" of "red circle")
    attn_layer: int = 1
    route_layer: int = 2
    attn_heads: int = 3
    min_coverage: float = 0.25  # patches an object covers less than this are left out of the patch loss
    max_turns: int = 8  # each row asks 1..max_turns questions about its image (the first one balanced)
    # Background-token curriculum: the LLM sees every object token but only `bg_start` random background tokens at
    # step 0, growing geometrically to all of them at `curriculum_steps`; full 576-token images from then on.
    curriculum_steps: int = 300
    bg_start: int = 32
    pos_init_scale: float = 0.2  # 2-D sin-cos init of the ViT position embedding, relative amplitude
    eval_every: int = 250
    eval_samples: int = 1000
    eval_batch: int = 50
    ckpt_every: int = 50
    seed: int = 0
    threads: int = 2
    spec: ModelSpec = field(default_factory=ModelSpec)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**{**d, "spec": ModelSpec(**d["spec"])})


# --------------------------------------------------------------------------------------------------- batches

def collate(samples: list[scenes.Sample], tokenizer, min_coverage: float = 0.25,
            follow_ups: list[list[tuple[str, str, str]]] | None = None, n_background: int | None = None,
            rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Left-padded rows ``prompt answer </s> [USER: q ASSISTANT: a </s>]...``, pixels and patch labels.

    The first turn equals ``processor(images, text)`` plus the answer (a test checks it); the PIL resize/crop is
    skipped because it is the identity at 336 px. ``follow_ups[i]`` are extra turns for row ``i``.
    ``keep_image`` marks the visual tokens the LLM sees: all of them, or (curriculum) every patch an object touches
    plus random background patches, ``n_background`` more than the batch's largest object-patch count, the same
    total for every row.
    """
    n_img = scenes.GRID**2
    eos = tokenizer.eos_token
    texts = []
    for i, s in enumerate(samples):
        text = prompt(s.question).replace("<image>", "<image>" * n_img) + f" {s.answer} {eos}"
        for q, a, _ in (follow_ups[i] if follow_ups else ()):
            text += f" USER: {q} ASSISTANT: {a} {eos}"
        texts.append(text)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ids = enc.input_ids
    # Supervised tokens: every answer (the token after "ASSISTANT:") and the </s> that closes it.
    after_assistant = torch.zeros_like(ids, dtype=torch.bool)
    after_assistant[:, 1:] = ids[:, :-1] == tokenizer.convert_tokens_to_ids("ASSISTANT:")
    first = after_assistant & (after_assistant.cumsum(-1) == 1)
    closing_eos = torch.zeros_like(after_assistant)
    closing_eos[:, 1:] = after_assistant[:, :-1] & (ids[:, 1:] == tokenizer.eos_token_id)
    pixels = np.stack([np.asarray(s.image, np.float32) for s in samples]) / 127.5 - 1.0  # mean = std = 0.5
    labels = []
    for s in samples:
        obj = s.patch_object.copy()
        obj[(s.patch_coverage > 0) & (s.patch_coverage < min_coverage)] = IGNORE  # ambiguous edge patches
        labels.append(obj)
    keep = np.ones((len(samples), n_img), bool)
    if n_background is not None:
        rng = rng or np.random.default_rng(0)
        objects = np.stack([s.patch_object.ravel() >= 0 for s in samples])
        total = min(n_img, int(objects.sum(1).max()) + n_background)
        for row, obj in enumerate(objects):
            bg = np.flatnonzero(~obj)
            keep[row] = obj
            keep[row, rng.choice(bg, total - int(obj.sum()), replace=False)] = True
    # Retrieval targets: turn t of row i asks about the objects whose patches are relevant[i, t] (none for an absent
    # object or a count of 0); anchor_mask marks each turn's anchor word, query_mask its "ASSISTANT:".
    n_turns = 1 + max((len(f) for f in follow_ups), default=0) if follow_ups else 1
    relevant = np.zeros((len(samples), n_turns, n_img), bool)
    anchors = np.zeros(ids.shape, bool)
    content = np.zeros(ids.shape, np.int64)  # turn + 1 at the words a turn's anchor gathers, else 0
    query = (ids == tokenizer.convert_tokens_to_ids("ASSISTANT:")).numpy()
    for i, s in enumerate(samples):
        questions = [s.question, *(q for q, _, _ in (follow_ups[i] if follow_ups else ()))]
        for t, (q, p) in enumerate(zip(questions, np.flatnonzero(query[i]))):
            anchors[i, p - anchor_distance(q)] = True
            words = q.split()
            for j, w in enumerate(words):
                if w in _CONTENT_WORDS or j == len(words) - anchor_distance(q):
                    content[i, p - len(words) + j] = t + 1
            objs = scenes.relevant_objects(q, s.objects)
            if objs:
                relevant[i, t] = np.isin(s.patch_object.ravel(), objs)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    last_image = ids.shape[1] - 1 - (ids == image_id).flip(-1).int().argmax(-1)
    return {
        "input_ids": ids,
        "attention_mask": enc.attention_mask,
        "pixel_values": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
        "keep_image": torch.from_numpy(keep),
        "answer_mask": after_assistant,
        "first_answer_mask": first,
        "eos_mask": closing_eos,
        # Logits are only needed after the image: the LM head runs on the last n_logits positions.
        "n_logits": torch.tensor(int(ids.shape[1] - last_image.min())),
        "patch_object": torch.from_numpy(np.stack(labels)).flatten(1),
        "patch_colour": torch.from_numpy(np.stack([s.patch_colour for s in samples])).flatten(1),
        "patch_shape": torch.from_numpy(np.stack([s.patch_shape for s in samples])).flatten(1),
        "present": torch.tensor(np.stack([_present(s) for s in samples]), dtype=torch.float32),
        "relevant": torch.from_numpy(relevant),
        "anchor_mask": torch.from_numpy(anchors),
        "content_turn": torch.from_numpy(content),
        "query_mask": torch.from_numpy(query),
    }


_NOT_ANCHORS = frozenset({"are", "there", "?"})
# Words that name what a question is about (not "shape" of "what colour is the shape in ...", which names nothing).
_CONTENT_WORDS = frozenset({*scenes.COLOUR_NAMES, *scenes.SHAPES, *(s + "s" for s in scenes.SHAPES), *scenes.REGIONS})


def anchor_distance(question: str) -> int:
    """How many tokens before "ASSISTANT:" the question's anchor word sits: its last word naming what is asked
    about (the region, the shape of "red circle", "shapes" of "how many red shapes are there ?")."""
    words = question.split()
    j = max(i for i, w in enumerate(words) if w not in _NOT_ANCHORS)
    return len(words) - j


def _present(s: scenes.Sample) -> np.ndarray:
    """Multi-hot over (colour, shape) pairs present in the scene."""
    v = np.zeros(len(scenes.COLOUR_NAMES) * len(scenes.SHAPES), np.float32)
    for o in s.objects:
        v[scenes.COLOUR_NAMES.index(o.colour) * len(scenes.SHAPES) + scenes.SHAPES.index(o.shape)] = 1.0
    return v


_REGION_OF_PATCH = torch.tensor([scenes.region_of_patch(r, c) for r in range(scenes.GRID) for c in range(scenes.GRID)])


# --------------------------------------------------------------------------------------------------- model + heads

class AuxHeads(nn.Module):
    """Training-only probes: per visual token the colour, shape, (colour, shape) pair and 3 x 3 region of the object
    covering it; per image, from the [CLS] token, which (colour, shape) pairs are present.

    The pair class (one per combination, not a sum of a colour and a shape) gives every object a direction of its
    own, so "the red circle" can be matched by attention without half-matching red squares and blue circles.
    """

    def __init__(self, llm_hidden: int, vit_hidden: int) -> None:
        super().__init__()
        self.n_colour, self.n_shape = len(scenes.COLOUR_NAMES) + 1, len(scenes.SHAPES)  # colour: + background
        self.n_pair = len(scenes.COLOUR_NAMES) * len(scenes.SHAPES) + 1
        self.patch = nn.Linear(llm_hidden, self.n_colour + self.n_shape + self.n_pair + 9)
        self.cls = nn.Linear(vit_hidden, len(scenes.COLOUR_NAMES) * len(scenes.SHAPES))

    def losses(self, visual: torch.Tensor, cls: torch.Tensor, batch: dict[str, torch.Tensor],
               min_coverage_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.patch(visual)  # (B, 576, C)
        lc, ls, lp, lr = logits.split([self.n_colour, self.n_shape, self.n_pair, 9], dim=-1)
        colour = batch["patch_colour"].masked_fill(~min_coverage_mask, IGNORE)
        shape = batch["patch_shape"].masked_fill(~min_coverage_mask, IGNORE)
        object_shape = torch.where(shape > 0, shape - 1, IGNORE)  # shape only on object patches (colour finds them)
        pair = torch.where(colour > 0, (colour - 1) * len(scenes.SHAPES) + shape, colour)  # 0 = bg, IGNORE kept
        # Region only on object patches: background tokens carry no "where" the question could ask about.
        region = _REGION_OF_PATCH.expand_as(colour).masked_fill(colour <= 0, IGNORE)
        out = {
            "colour": F.cross_entropy(lc.flatten(0, 1), colour.flatten(), ignore_index=IGNORE),
            "shape": F.cross_entropy(ls.flatten(0, 1), object_shape.flatten(), ignore_index=IGNORE),
            "pair": F.cross_entropy(lp.flatten(0, 1), pair.flatten(), ignore_index=IGNORE),
            "cls": F.binary_cross_entropy_with_logits(self.cls(cls), batch["present"]),
        }
        if (region >= 0).any():
            out["region"] = F.cross_entropy(lr.flatten(0, 1), region.flatten(), ignore_index=IGNORE)
        return out


class _Capture:
    """Forward hooks that keep the projector output (the LLM's visual tokens) and the ViT feature layer's output."""

    def __init__(self, model: nn.Module, decoder_layers: tuple[int, ...] = ()) -> None:
        self.store: dict[str, torch.Tensor] = {}
        tower = model.model.vision_tower  # CLIPVisionModel in transformers 5.x; older versions wrap a vision_model
        layers = (tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder).layers
        # hidden_states[-2] (vision_feature_layer) is the output of encoder layer -2.
        feature_layer = layers[model.config.vision_feature_layer]
        self.handles = [
            model.model.multi_modal_projector.register_forward_hook(self._keep("visual")),
            feature_layer.register_forward_hook(self._keep("vit")),
        ]
        for i in decoder_layers:  # the normed input of that decoder layer's attention, to recompute its q / k
            norm = model.model.language_model.layers[i].input_layernorm
            self.handles.append(norm.register_forward_hook(self._keep(f"attn_in{i}")))

    def _keep(self, key: str):
        def hook(_module, _inputs, output):
            self.store[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def step_losses(model: nn.Module, heads: AuxHeads, capture: _Capture, batch: dict[str, torch.Tensor],
                cfg: TrainConfig, *, vision_only: bool = False) -> dict[str, torch.Tensor]:
    """All loss terms for one batch; ``total`` is the weighted sum that is optimised.

    ``vision_only`` (stage 1) runs the ViT and projector but not the LLM: only the patch and [CLS] heads' losses.
    """
    feats = torch.stack(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    cover_ok = batch["patch_object"] != IGNORE
    aux = heads.losses(capture.store["visual"], capture.store["vit"][:, 0], batch, cover_ok)
    patch_terms = aux["colour"] + cfg.shape_weight * aux["shape"] + aux["pair"] + aux.get("region", 0.0)
    vision_trains = vision_only or not cfg.freeze_vision
    aux_total = cfg.aux_weight * patch_terms + (cfg.cls_weight * aux["cls"] if vision_trains else 0.0)
    if vision_only:
        return {**aux, "total": aux_total}

    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Same positions as generate() uses for a left-padded batch; dropped visual tokens leave gaps (as vtprune's
    # default pruning does), so positions keep their meaning when the curriculum ends.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    n = int(batch["n_logits"])
    is_image = ids == model.config.image_token_id
    keep = ~is_image
    keep[is_image] = batch["keep_image"].flatten()  # image tokens are contiguous: row-major order matches
    B, kept = ids.shape[0], int(keep[0].sum())
    ids_k, mask_k, pos_k = (t[keep].view(B, kept) for t in (ids, mask, position_ids))
    embeds = model.get_input_embeddings()(ids_k)
    embeds = embeds.masked_scatter((ids_k == model.config.image_token_id)[..., None], feats[batch["keep_image"]])
    out = model(inputs_embeds=embeds, attention_mask=mask_k, position_ids=pos_k, logits_to_keep=n, use_cache=False)
    # logits[:, j] is position L - n + j and predicts token L - n + j + 1.
    logits = out.logits[:, :-1]
    targets = ids[:, -n + 1:]

    def ce(sel: torch.Tensor) -> torch.Tensor:
        sel = sel[:, -n + 1:]
        return F.cross_entropy(logits[sel], targets[sel])

    losses = {"lm": ce(batch["answer_mask"]), "eos": ce(batch["eos_mask"]), **aux}
    losses["total"] = losses["lm"] + 0.2 * losses["eos"] + aux_total
    if cfg.attn_weight > 0:
        retrieval = retrieval_losses(model, capture, batch, keep, ids_k, mask_k, pos_k, cfg)
        losses.update(retrieval)
        losses["total"] = losses["total"] + cfg.attn_weight * (retrieval["gather"] + retrieval["retrieve"]
                                                               + retrieval["route"])
    first = batch["first_answer_mask"][:, -n + 1:]
    losses["answer_acc"] = (logits[first].argmax(-1) == targets[first]).float().mean()
    return losses


def attention_log_mass(model: nn.Module, layer: int, hidden: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                       rows: torch.Tensor, queries: torch.Tensor, target: torch.Tensor, n_heads: int,
                       spread: bool = False) -> torch.Tensor:
    """log(attention mass on ``target``) of heads ``[0, n_heads)`` of decoder ``layer`` at query positions
    ``(rows, queries)``, recomputed from the layer's normed input ``hidden`` (B, L, D) with its own q / k projections
    and RoPE over the causal, unpadded keys. ``target`` is (N, L) bool; returns (N, n_heads).

    ``spread``: the mean over target positions of log(attention on that position) instead, which only a spread over
    all of them maximises (the log of the mass is also maximised by one target position taking it all)."""
    lm = model.model.language_model
    attn = lm.layers[layer].self_attn
    tc = model.config.text_config
    heads, kv = tc.num_attention_heads, tc.num_key_value_heads
    hd = tc.hidden_size // heads
    B, L, _ = hidden.shape
    cos, sin = lm.rotary_emb(hidden, position_ids=pos)  # (B, L, hd)

    def rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # x (..., h, hd), c / s (..., hd)
        c, s = c.unsqueeze(-2), s.unsqueeze(-2)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    q = attn.q_proj(hidden[rows, queries]).view(-1, heads, hd)[:, :n_heads]  # (N, h, hd)
    q = rope(q, cos[rows, queries], sin[rows, queries])
    k = rope(attn.k_proj(hidden).view(B, L, kv, hd), cos, sin)[:, :, torch.arange(n_heads) // (heads // kv)]
    scores = torch.einsum("nhd,nlhd->nhl", q, k[rows]) * hd**-0.5  # (N, h, L)
    visible = (torch.arange(L)[None] <= queries[:, None]) & mask[rows].bool()  # (N, L)
    neg = torch.finfo(scores.dtype).min
    lse_all = scores.masked_fill(~visible[:, None], neg).logsumexp(-1)
    if spread:
        on = (target & visible)[:, None].float()
        return (scores * on).sum(-1) / on.sum(-1).clamp(min=1) - lse_all
    return scores.masked_fill(~(target & visible)[:, None], neg).logsumexp(-1) - lse_all


def retrieval_losses(model: nn.Module, capture: _Capture, batch: dict[str, torch.Tensor], keep: torch.Tensor,
                     ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cfg: TrainConfig
                     ) -> dict[str, torch.Tensor]:
    """-log attention mass of the retrieval circuit (see ``TrainConfig.attn_weight``), and the masses for the log.

    retrieve: each anchor word -> the patches of the objects its question is about (turns about no present object
    are skipped); route: each "ASSISTANT:" -> its anchor word. ``keep`` maps the full rows to the (curriculum-thinned)
    sequence ``ids``.
    """
    B, L = ids.shape
    anchor = batch["anchor_mask"][keep].view(B, L)
    query = batch["query_mask"][keep].view(B, L)
    rows, q_pos = query.nonzero(as_tuple=True)  # row-major: turn order within a row
    a_rows, a_pos = anchor.nonzero(as_tuple=True)
    assert torch.equal(rows, a_rows), "every turn has one anchor"
    turn = (query.cumsum(1) - 1)[rows, q_pos]
    n_heads = max(1, min(cfg.attn_heads, model.config.text_config.num_attention_heads))

    route_target = torch.zeros(len(rows), L, dtype=torch.bool)
    route_target[torch.arange(len(rows)), a_pos] = True
    route = attention_log_mass(model, cfg.route_layer, capture.store[f"attn_in{cfg.route_layer}"], pos, mask,
                               rows, q_pos, route_target, n_heads)

    words = batch["content_turn"][keep].view(B, L)[rows] == (turn + 1)[:, None]  # (N, L)
    gather = attention_log_mass(model, cfg.gather_layer, capture.store[f"attn_in{cfg.gather_layer}"], pos, mask,
                                rows, a_pos, words, n_heads, spread=True)

    is_image = ids == model.config.image_token_id
    patches = torch.zeros(len(rows), L, dtype=torch.bool)
    patches[is_image[rows]] = batch["relevant"][rows, turn][batch["keep_image"][rows]]
    sup = patches.any(1)
    retrieve = attention_log_mass(model, cfg.attn_layer, capture.store[f"attn_in{cfg.attn_layer}"], pos, mask,
                                  rows[sup], a_pos[sup], patches[sup], n_heads)
    return {"gather": -gather.mean(), "retrieve": -retrieve.mean(), "route": -route.mean(),
            **{f"{k}_mass": v.detach().exp().mean() for k, v in
               (("gather", gather), ("retrieve", retrieve), ("route", route))}}


def background_tokens(step: int, cfg: TrainConfig) -> int | None:
    """Background visual tokens the LLM sees at ``step`` (None = all).

    Why: at initialisation attention is uniform, so an answer position gets ~1/600 of its input from any one object
    token and the gradient that would sharpen it is as small; escaping that plateau takes time proportional to the
    sequence length (EVAL_INFRA's 36-token model escaped in ~300 steps; this 576-token one had not after 500).
    Starting with few background tokens lets attention learn to find objects; the geometric ramp then adds
    background at a constant rate in log(tokens), which is what the attention logits have to track.
    """
    if step >= cfg.curriculum_steps:
        return None
    full = scenes.GRID**2
    return int(round(cfg.bg_start * (full / cfg.bg_start) ** (step / cfg.curriculum_steps)))


def init_position_embedding(model: nn.Module, scale: float) -> None:
    """2-D sin-cos init of the ViT's learned position embedding ([CLS] row zero), still trained afterwards.

    CLIP's default init (std 0.02) is an order of magnitude below the patch embeddings, and the region questions
    (and the region head) then wait hundreds of steps for position to surface in the features.
    """
    emb = model.model.vision_tower.embeddings.position_embedding.weight  # (1 + GRID^2, D)
    d = emb.shape[1] // 4
    freqs = 1.0 / 10000 ** (torch.arange(d) / d)
    rows, cols = torch.meshgrid(torch.arange(scenes.GRID), torch.arange(scenes.GRID), indexing="ij")
    parts = [f(x.flatten()[:, None].float() * freqs) for x in (rows, cols) for f in (torch.sin, torch.cos)]
    table = torch.cat(parts, dim=1)
    with torch.no_grad():
        emb.zero_()
        emb[1:, : table.shape[1]] = scale * table


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``; the vision stage and the LLM stage each get one."""
    vision = step < cfg.vision_steps
    start, length, peak = ((0, cfg.vision_steps, cfg.vision_lr) if vision
                           else (cfg.vision_steps, cfg.steps - cfg.vision_steps, cfg.lr))
    step -= start
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, length - cfg.warmup))
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, step: int, model: nn.Module, heads: nn.Module, opt: torch.optim.Optimizer,
                    cfg: TrainConfig, extra: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (model + heads), ``optimizer.safetensors`` and ``state.json`` atomically enough:
    the JSON, which marks a checkpoint valid, is written last."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"heads.{k}": v.detach().contiguous() for k, v in heads.state_dict().items()})
    save_file(tensors, path / "model.safetensors.tmp")
    opt_state = opt.state_dict()
    opt_tensors = {f"{i}.{k}": v.contiguous() for i, s in opt_state["state"].items() for k, v in s.items()}
    opt_tensors["rng.torch"] = torch.get_rng_state()
    save_file(opt_tensors, path / "optimizer.safetensors.tmp")
    for name in ("model.safetensors", "optimizer.safetensors"):
        (path / f"{name}.tmp").replace(path / name)
    state = {"step": step, "config": asdict(cfg), "param_groups": opt_state["param_groups"], **extra}
    (path / "state.json.tmp").write_text(json.dumps(state, indent=1))
    (path / "state.json.tmp").replace(path / "state.json")


def load_checkpoint(path: Path, model: nn.Module, heads: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns the JSON state."""
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "model.safetensors")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    heads.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("heads.")})
    opt_tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(opt_tensors.pop("rng.torch"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in opt_tensors.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return state


# --------------------------------------------------------------------------------------------------- training

def train(cfg: TrainConfig, *, fresh: bool = False, progress: bool = True, ship: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training; ship the model (without heads) to ``cfg.out``. Returns the final summary.

    ``stop_after`` ends the run early at that step (checkpointed, not shipped), e.g. to time-box a session; the
    learning-rate schedule still follows ``cfg.steps``, so resuming later gives the uninterrupted run.
    """
    bad = {k: getattr(cfg, k) for k in ("gather_layer", "attn_layer", "route_layer")
           if not 0 <= getattr(cfg, k) < cfg.spec.llm_layers}
    if cfg.attn_weight > 0 and bad:
        raise ValueError(f"retrieval supervision layers {bad} must lie in [0, llm_layers={cfg.spec.llm_layers})")
    torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    ckpt = Path(cfg.ckpt_dir)
    log_path = ckpt / "log.jsonl"
    processor = build_processor()
    tok = processor.tokenizer
    model = build_model(cfg.spec, tok, seed=cfg.seed)
    init_position_embedding(model, cfg.pos_init_scale)
    heads = AuxHeads(cfg.spec.llm_hidden, cfg.spec.vit_hidden)
    params = [*model.parameters(), *heads.parameters()]
    # No weight decay on norms and biases (1-D tensors): standard for transformers.
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    start, elapsed = 0, 0.0
    if not fresh and (ckpt / "state.json").exists():
        state = load_checkpoint(ckpt, model, heads, opt)
        if state["config"] != asdict(cfg):
            raise ValueError(f"checkpoint in {ckpt} was made with another config; pass --fresh to start over\n"
                             f"  checkpoint: {state['config']}\n  now:        {asdict(cfg)}")
        start, elapsed = state["step"], state["elapsed_s"]
        _truncate_log(log_path, start)
    else:
        ckpt.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        torch.manual_seed(cfg.seed)

    heldout = scenes.heldout(cfg.eval_samples)
    capture = _Capture(model, (cfg.gather_layer, cfg.attn_layer, cfg.route_layer) if cfg.attn_weight > 0 else ())
    model.train()
    t0 = time.perf_counter() - elapsed
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train", disable=not progress)
    last_eval: dict[str, Any] = {}
    try:
        with log_path.open("a") as log:
            for step in bar:
                vision_only = step < cfg.vision_steps
                if not vision_only and cfg.freeze_vision:
                    model.model.vision_tower.requires_grad_(False)
                samples = [scenes.make_sample(step * cfg.batch_size + i) for i in range(cfg.batch_size)]
                turns = np.random.default_rng((cfg.seed, step)).integers(0, cfg.max_turns, cfg.batch_size)
                extra = [scenes.follow_up_questions(s, int(k), cfg.seed) for s, k in zip(samples, turns)]
                batch = collate(samples, tok, cfg.min_coverage, extra, background_tokens(step - cfg.vision_steps, cfg),
                                np.random.default_rng((cfg.seed, step, 1)))
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                losses = step_losses(model, heads, capture, batch, cfg, vision_only=vision_only)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()

                done = step + 1
                rec = {"step": done, "lr": lr_at(step, cfg), "grad_norm": float(grad_norm),
                       "visual_tokens": 0 if vision_only else int(batch["keep_image"][0].sum()),
                       "time_s": round(time.perf_counter() - t0, 1),
                       **{k: round(v.item(), 5) for k, v in losses.items()}}
                if (done % cfg.eval_every == 0 or done == cfg.steps) and not vision_only:
                    model.eval()
                    res = evaluate(model, processor, heldout, batch_size=cfg.eval_batch)
                    model.train()
                    last_eval = {"heldout_acc": res.accuracy, "heldout_per_type": res.per_type}
                    rec.update(last_eval)
                    tqdm.write(f"step {done}: held-out acc {res.accuracy:.4f} "
                               + " ".join(f"{k}={v:.3f}" for k, v in res.per_type.items()))
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("total", "lm", "answer_acc", "retrieve_mass")
                                if k in rec})
                if done % cfg.ckpt_every == 0 or done == end:
                    save_checkpoint(ckpt, done, model, heads, opt, cfg,
                                    {"elapsed_s": time.perf_counter() - t0, **last_eval})
    finally:
        capture.remove()

    summary = {"steps": end, "train_time_s": round(time.perf_counter() - t0, 1), **last_eval}
    if ship and end == cfg.steps:
        ship_model(model, processor, Path(cfg.out), {"config": asdict(cfg), **summary})
    return summary


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be recomputed identically)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def ship_model(model: nn.Module, processor, out: Path, summary: dict[str, Any]) -> None:
    """Save the model (safetensors, no heads), processor, tokenizer and chat template to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    canonical_llava_layout(out)  # the llava-hf layout vLLM loads (transformers loads both)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "spec":
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    for f in fields(ModelSpec):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=getattr(defaults.spec, f.name))
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--no-ship", action="store_true", help="do not write the final model to --out")
    p.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) at this step; resume later")
    args = vars(p.parse_args(argv))
    fresh, no_ship, stop_after = args.pop("fresh"), args.pop("no_ship"), args.pop("stop_after")
    spec = ModelSpec(**{f.name: args.pop(f.name) for f in fields(ModelSpec)})
    cfg = replace(TrainConfig(**args), spec=spec)
    summary = train(cfg, fresh=fresh, ship=not no_ship, stop_after=stop_after)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
