#!/usr/bin/env python
"""Train a small LLaVA-NeXT-Video on the synthetic video QA set on CPU; ship it to ``models/synthetic-llava-video``.

    python scripts/train_synthetic_video.py                 # reproduces the shipped model (resumes if interrupted)
    python scripts/train_synthetic_video.py --stop-after 200   # time-box a session; rerun to continue

**Model.** A stock ``LlavaNextVideoForConditionalGeneration`` initialised from ``models/synthetic-llava`` (the image
model of ``scripts/train_synthetic.py``): the same CLIP ViT (336 px / 14, features of layer -2, [CLS] dropped),
projector and Llama; each frame's 24 x 24 ViT features are average-pooled 2 x 2 (``spatial_pool_stride=2``) before
the projector, so a frame is 144 tokens and the 8 frames ``vtprune video-qa`` samples by default are 1,152. The
word-level vocabulary gains ``<video>`` and the video questions' words (``tokenizer.video_vocabulary``) after the
image ids, so every image word keeps its embedding. Frames (160 x 120) are stretched to 336 x 336 without the
NeXT-Video centre crop, which would cut off objects near the sides (``video_preprocessor_config.json``).

**Data.** Row ``i`` of step ``s`` is ``synthetic_video.make_item(s * batch + i, seed=train_seed)`` (held-out: seed
0, the generator's default, so ``python -m vtprune.synthetic_video --out DIR`` writes held-out questions), rendered
directly at the 8 frames ``load_video(num_frames=8)`` samples (no mp4 round trip; the mp4 gap is measured by
evaluating the shipped model with ``vtprune video-qa``). Its own question comes first, then up to ``max_turns - 1``
more questions about the same video, of every kind its tracks answer unambiguously (1,152 visual tokens dominate a
row, so extra turns are nearly free supervision). Each turn is exactly what ``vtprune video-qa`` feeds: the
question, lettered options and the letter instruction. The answer trained is the option's *text* ("left", "3"),
which video-qa scores through its option-text fallback (a reply without a standalone letter is right when it names
exactly the gold option); the letter would need one more lookup, from the answer to its option line (not tried).

**Supervision.** The ViT is frozen (features under ``no_grad``; its last layer, which LLaVA never reads, is skipped);
projector and LLM train on cross-entropy of every answer word (+ 0.2 x its ``</s>``) and, as in the image script (its
docstring explains why a from-scratch LLM needs it), -log attention mass of the first ``attn_heads`` heads:

* motion (``gather_layer``): every object token of a later frame attends (spread) to the same object's tokens in
  earlier frames, so its residual can hold where the object came from (frames carry no time embedding: RoPE
  positions only);
* gather (``gather_layer``): the question's anchor word -> its content words ("red", "circle");
* retrieve (``attn_layer``): anchor -> the tokens of the object(s) the question is about: the object moving that
  way / of that colour (frames after it appeared, where motion is known), every object of the last frame (count),
  the first object in the first frame it shows (first);
* route (``route_layer``): "ASSISTANT:" -> the anchor.

During training the LLM sees every token an object touches plus a ``bg_keep`` share of the background tokens (with
their original positions; gaps as vtprune's pruning leaves), which cuts a step's cost; held-out evaluation sees all.
Checkpoints are safetensors + JSON (``train_synthetic.save_checkpoint``), seeded per step: a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import os

# Must precede the first torch import: spin-waiting OpenMP threads were measured 10x slower on 2 shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_synthetic as ts  # noqa: E402  (checkpoints, attention supervision, allocator setting)

from vtprune import synthetic_video as sv  # noqa: E402
from vtprune.synthetic.tokenizer import CHAT_TEMPLATE, VIDEO, build_tokenizer  # noqa: E402
from vtprune.video.inputs import FramePreprocessor  # noqa: E402
from vtprune.video.read import uniform_indices  # noqa: E402
from vtprune.video_qa import format_question  # noqa: E402

SIDE, PATCH, STRIDE = 336, 14, 2
CELLS_SIDE = SIDE // PATCH // STRIDE  # 12 pooled cells per side
CELLS = CELLS_SIDE**2  # 144 tokens per frame
CELL_PX = SIDE // CELLS_SIDE  # 28 px
# The checkpoint's video preprocessing: stretch to 336 x 336 (no centre crop), mean = std = 0.5 as the image model.
VIDEO_PREPROCESSOR: dict[str, Any] = {
    "video_processor_type": "LlavaNextVideoVideoProcessor", "do_resize": True, "size": {"height": SIDE, "width": SIDE},
    "do_center_crop": False, "crop_size": {"height": SIDE, "width": SIDE}, "resample": 3, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    "do_convert_rgb": True, "do_sample_frames": False,
}


@dataclass
class VideoTrainConfig:
    """Every knob of a run; the defaults reproduce the shipped model."""

    out: str = "models/synthetic-llava-video"
    init: str = "models/synthetic-llava"
    ckpt_dir: str = "out/train_synthetic_video"
    steps: int = 720
    batch_size: int = 6
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    frames: int = 8  # sampled as `vtprune video-qa --frames 8` does (uniform, first and last included)
    max_turns: int = 8
    attn_weight: float = 1.0
    motion_weight: float = 1.0
    gather_layer: int = 0
    attn_layer: int = 1
    route_layer: int = 2
    attn_heads: int = 3
    min_coverage: float = 0.3  # a token is an object's when the object covers this share of its 28 x 28 px cell
    bg_keep: float = 0.4  # share of background tokens the LLM sees in training (all of them at evaluation)
    eval_every: int = 125
    eval_samples: int = 50
    eval_batch: int = 10
    ckpt_every: int = 20
    seed: int = 0
    train_seed: int = 1  # make_item seed of the training stream (held-out questions: seed 0)
    threads: int = 1


# --------------------------------------------------------------------------------------------------- model


def build_video_model(cfg: VideoTrainConfig, tokenizer) -> nn.Module:
    """LLaVA-NeXT-Video with the image model's ViT, projector and LLM; new words' embeddings copy a lower-case /
    unpunctuated twin from the image vocabulary when there is one ("How" <- "how"), else are drawn at its scale."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextVideoConfig
    from transformers import LlavaNextVideoForConditionalGeneration as NextVideo

    image_cfg = LlavaConfig.from_pretrained(cfg.init)
    text = image_cfg.text_config.to_dict()
    text.update(vocab_size=len(tokenizer), max_position_embeddings=2048)
    config = LlavaNextVideoConfig(
        vision_config=image_cfg.vision_config.to_dict(), text_config=text,
        image_token_index=image_cfg.image_token_id, video_token_index=tokenizer.convert_tokens_to_ids(VIDEO),
        spatial_pool_mode="average", spatial_pool_stride=STRIDE, image_grid_pinpoints=[[SIDE, SIDE]],
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        multimodal_projector_bias=True, image_seq_length=(SIDE // PATCH) ** 2, video_seq_length=cfg.frames * CELLS,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = NextVideo._from_config(config, attn_implementation="sdpa")
    image = LlavaForConditionalGeneration.from_pretrained(cfg.init).state_dict()
    own = model.state_dict()
    resized = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    missing = set(own) - set(image) - {"model.image_newline"}
    if missing:
        raise RuntimeError(f"weights the image model does not have: {sorted(missing)}")
    with torch.no_grad():
        for k, v in image.items():
            if k not in resized:
                own[k].copy_(v)
        old_vocab = LlavaConfig.from_pretrained(cfg.init).text_config.vocab_size
        image_tok = build_tokenizer()
        g = torch.Generator().manual_seed(cfg.seed)
        for key in resized:
            old, new = image[key], own[key]
            new[:old_vocab] = old
            for i in range(old_vocab, len(tokenizer)):
                twin = image_tok.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(i).lower().rstrip("?."))
                new[i] = old[twin] if twin != image_tok.unk_token_id else torch.randn(old.shape[1], generator=g) * \
                    old.std()
        model.model.image_newline.zero_()  # images are not what this model is for
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)
    gc.do_sample, gc.max_new_tokens = False, 2
    return model


class FrozenFeatures:
    """The frozen ViT's layer -2 features, pooled: (N, 3, 336, 336) -> (N, 144, Dv), as ``get_video_features``
    computes them before the projector, without running the ViT layer after the one LLaVA reads."""

    def __init__(self, model: nn.Module) -> None:
        self.tower = model.model.vision_tower
        self.resampler = model.model.vision_resampler
        enc = self.tower.encoder if hasattr(self.tower, "encoder") else self.tower.vision_model.encoder
        self.encoder, self.layers = enc, enc.layers

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoder.layers = self.layers[:-1]  # last_hidden_state (no post-norm) = hidden_states[-2] of the full one
        try:
            h = self.tower(pixel_values=pixels).last_hidden_state[:, 1:]  # (N, 576, Dv), [CLS] dropped
        finally:
            self.encoder.layers = self.layers
        return self.resampler(h)  # (N, 144, Dv)


# --------------------------------------------------------------------------------------------------- data


def object_cover(tracks: list[sv.Track], frame_ids: np.ndarray, width: int = 160, height: int = 120) -> np.ndarray:
    """(F, n_objects, 144): the share of each pooled token's 28 x 28 px cell of the stretched 336 x 336 frame
    where the object is the one on top (render() draws later tracks over earlier ones)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) + 0.5
    xx, yy = xx * width / SIDE, yy * height / SIDE  # pixel centres in the original frame
    out = np.zeros((len(frame_ids), len(tracks), CELLS), np.float32)
    for fi, f in enumerate(frame_ids):
        label = np.full((SIDE, SIDE), -1, np.int64)
        for o, t in enumerate(tracks):
            if f < t.start:
                continue
            cx, cy = t.centre(int(f))
            dx, dy, r = xx - cx, yy - cy, t.radius
            if t.shape == "circle":
                mask = dx * dx + dy * dy <= r * r
            elif t.shape == "square":
                mask = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
            else:
                mask = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
            label[mask] = o
        blocks = label.reshape(CELLS_SIDE, CELL_PX, CELLS_SIDE, CELL_PX).transpose(0, 2, 1, 3).reshape(CELLS, -1)
        for o in range(len(tracks)):
            out[fi, o] = (blocks == o).mean(1)
    return out


@dataclass
class Turn:
    question: str  # as video-qa formats it (question, lettered options, instruction)
    answer: str  # the gold option's text
    kind: str
    anchor: int  # word index (in question.split()) of the anchor word
    content: list[int]  # word indices the anchor gathers
    target: np.ndarray  # (F, 144) bool: the tokens the anchor retrieves


@dataclass
class VideoSample:
    index: int
    frames: np.ndarray  # (F, 120, 160, 3) uint8
    objects: np.ndarray  # (F, n_obj, 144) bool: object tokens
    turns: list[Turn]


def _direction(t: sv.Track) -> str:
    return next(d for d, (dx, dy) in sv.DIRECTIONS.items() if (np.sign(t.vx), np.sign(t.vy)) == (dx, dy))


def _turn(question: str, options: list[str], answer: str, kind: str, anchor_word: str, content_words: list[str],
          target: np.ndarray) -> Turn:
    words = question.split()
    return Turn(format_question({"question": question, "options": options}), answer, kind, words.index(anchor_word),
                [words.index(w) for w in content_words], target)


def video_questions(item: sv.Item, tracks: list[sv.Track], objects: np.ndarray, rng: np.random.Generator
                    ) -> list[Turn]:
    """Every question of the five kinds the tracks answer unambiguously in the sampled frames (the item's own
    first when it is one), with make_item's option rules; ``objects`` is (F, n_obj, 144) bool."""
    colours, dirs = list(sv.COLOURS), list(sv.DIRECTIONS)
    cols = [t.colour for t in tracks]
    F_ = objects.shape[0]
    seen = objects.any(-1)  # (F, n_obj)
    first_seen = np.where(seen.any(0), seen.argmax(0), F_)  # first sampled frame showing each object
    moving = [objects[:, o] & (np.arange(F_) > first_seen[o])[:, None] for o in range(len(tracks))]
    directions = [_direction(t) for t in tracks]
    out: list[Turn] = []
    for o, t in enumerate(tracks):
        if first_seen[o] >= F_ - 1:  # never seen in two sampled frames (hidden under another object)
            continue
        q = f"What shape is the {t.colour} object?"
        out.append(_turn(q, sv._options(rng, t.shape, list(sv.SHAPES)), t.shape, "shape_of", "object?",
                         [t.colour, "object?"], objects[:, o]))
        q = f"Which direction does the {t.colour} {t.shape} move?"
        out.append(_turn(q, sv._options(rng, directions[o], dirs), directions[o], "direction_of", t.shape,
                         [t.colour, t.shape], moving[o]))
        if directions.count(directions[o]) == 1:
            q = f"Which colour moves {directions[o]}?"
            out.append(_turn(q, sv._options(rng, t.colour, colours, preferred=cols), t.colour, "direction_colour",
                             f"{directions[o]}?", [f"{directions[o]}?"], moving[o]))
    if (first_seen < F_).all():
        q = "How many objects appear in the video?"
        n = str(len(tracks))
        out.append(_turn(q, sv._options(rng, n, [str(i) for i in range(1, 7)]), n, "count", "objects", ["objects"],
                         objects[-1].any(0)[None].repeat(F_, 0) & (np.arange(F_) == F_ - 1)[:, None]))
    order = np.argsort(first_seen, kind="stable")
    if len(tracks) == 1 or first_seen[order[0]] < first_seen[order[1]]:
        o = int(order[0])
        q = "Which colour appears first?"
        target = objects[:, o] & (np.arange(F_) == first_seen[o])[:, None]
        out.append(_turn(q, sv._options(rng, cols[o], colours, preferred=cols), cols[o], "first", "first?",
                         ["first?"], target))
    own = [t for t in out if t.question.split("\n")[0] == item.question and t.answer == item.answer]
    if own:  # the item's own question (with its own options) leads
        own[0].question = format_question({"question": item.question, "options": item.options})
        out.remove(own[0])
        out.insert(0, own[0])
    return out


def make_video_sample(index: int, seed: int, frames: int, min_coverage: float, max_turns: int | None = None,
                      turn_seed: int = 0) -> VideoSample:
    """Item ``index`` of the set drawn with ``seed``: its sampled frames, object tokens and question turns (its own
    question first; ``max_turns`` None: only that one, as held-out evaluation asks)."""
    item, tracks = sv.make_item(index, seed)
    ids = uniform_indices(item.frames, frames)
    pixels = sv.render(tracks, item.frames, 160, 120)[ids]
    cover = object_cover(tracks, ids)
    # a token is an object's when covered enough, or when it is the object's best-covered token in that frame
    best = cover.max(-1, keepdims=True)
    objects = (cover > 0) & (cover >= np.minimum(min_coverage, best))
    rng = np.random.default_rng([seed, index, 7, turn_seed])
    turns = video_questions(item, tracks, objects, rng)
    if max_turns is None:
        own = format_question({"question": item.question, "options": item.options})
        lead = turns[0] if turns and turns[0].question == own else None
        turns = [lead or Turn(own, item.answer, item.kind, 0, [], np.zeros((frames, CELLS), bool))]
    else:
        lead, rest = turns[:1], turns[1:]
        if lead and lead[0].question.split("\n")[0] != item.question:  # own question ambiguous: no lead
            lead, rest = [], turns
        picked = rng.permutation(len(rest))[: max_turns - len(lead)]
        turns = lead + [rest[i] for i in sorted(picked)]
    return VideoSample(index, pixels, objects, turns)


def collate(samples: list[VideoSample], tok, pre: FramePreprocessor, bg_keep: float = 1.0,
            rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Left-padded rows ``<s> USER: <video>x1152 q ASSISTANT: a </s> [USER: q ASSISTANT: a </s>]...`` (the first
    turn's prompt is token for token what ``VideoInputBuilder`` feeds; a test checks it), with position ids of the
    full sequence and, per row, which of the F x 144 video tokens it keeps (objects + ``bg_keep`` of background)."""
    ids_of = tok.convert_tokens_to_ids
    bos, eos, pad, user, asst, video = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, ids_of("USER:"),
                                        ids_of("ASSISTANT:"), ids_of(VIDEO))
    rng = rng or np.random.default_rng(0)
    rows, positions, kept_cells, marks = [], [], [], []
    for s in samples:
        n_frames = s.frames.shape[0]
        is_obj = s.objects.any(1).ravel()  # (F*144,)
        keep = is_obj | (rng.random(is_obj.shape) < bg_keep) if bg_keep < 1 else np.ones_like(is_obj)
        cells = np.flatnonzero(keep)
        ids = [bos, user, *([video] * len(cells))]
        pos = [0, 1, *(2 + cells).tolist()]
        nxt = 2 + n_frames * CELLS  # the next position in the full sequence
        m: dict[str, list] = {"answer": [], "eos": [], "anchor": [], "query": [], "content": []}
        for t, turn in enumerate(s.turns):
            words = turn.question.split()
            if t:
                ids.append(user)
                pos.append(nxt)
                nxt += 1
            start = len(ids)
            ids += [ids_of(w) for w in words] + [asst, ids_of(turn.answer), eos]
            pos += list(range(nxt, nxt + len(words) + 3))
            nxt += len(words) + 3
            m["anchor"].append(start + turn.anchor)
            m["content"].append([start + j for j in turn.content])
            m["query"].append(start + len(words))
            m["answer"].append(start + len(words) + 1)
            m["eos"].append(start + len(words) + 2)
        rows.append(ids)
        positions.append(pos)
        kept_cells.append(cells)
        marks.append(m)
    L = max(map(len, rows))
    B = len(rows)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    pos_ids = torch.zeros(B, L, dtype=torch.long)
    for i, (ids, pos) in enumerate(zip(rows, positions)):
        input_ids[i, L - len(ids):] = torch.tensor(ids)
        mask[i, L - len(ids):] = 1
        pos_ids[i, L - len(ids):] = torch.tensor(pos)
        shift = L - len(ids)
        marks[i] = {k: ([[p + shift for p in v] for v in vs] if k == "content" else [p + shift for p in vs])
                    for k, vs in marks[i].items()}
    pixels = torch.cat([pre(s.frames)["pixel_values_videos"] for s in samples])  # (B, F, 3, 336, 336)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos_ids, "pixel_values_videos": pixels,
            "kept_cells": kept_cells, "marks": marks, "samples": samples}


# --------------------------------------------------------------------------------------------------- losses


def forward(model: nn.Module, feats: FrozenFeatures, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, L, D) after the final norm, the LLM input embeddings (B, L, D)): the frozen ViT's pooled
    features through the (trained) projector, scattered into the rows at their kept video tokens."""
    pv = batch["pixel_values_videos"]
    B, n_frames = pv.shape[:2]
    pooled = feats(pv.flatten(0, 1))  # (B*F, 144, Dv), no grad
    visual = model.model.multi_modal_projector(pooled).view(B, n_frames * CELLS, -1)  # (B, F*144, D)
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    is_video = ids == model.config.video_token_id
    chosen = torch.cat([visual[i, torch.from_numpy(c)] for i, c in enumerate(batch["kept_cells"])])
    embeds = embeds.masked_scatter(is_video[..., None], chosen)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                     position_ids=batch["position_ids"], use_cache=False)
    return out.last_hidden_state, embeds


def step_losses(model: nn.Module, feats: FrozenFeatures, capture: ts._Capture, batch: dict[str, Any],
                cfg: VideoTrainConfig) -> dict[str, torch.Tensor]:
    hidden, _ = forward(model, feats, batch)
    marks = batch["marks"]
    rows = torch.tensor([i for i, m in enumerate(marks) for _ in m["answer"]])
    ans_pos = torch.tensor([p for m in marks for p in m["answer"]])
    eos_pos = torch.tensor([p for m in marks for p in m["eos"]])
    ids = batch["input_ids"]
    logits_ans = model.lm_head(hidden[rows, ans_pos - 1])  # (T, V): the token before the answer predicts it
    logits_eos = model.lm_head(hidden[rows, eos_pos - 1])
    losses = {"lm": F.cross_entropy(logits_ans, ids[rows, ans_pos]),
              "eos": F.cross_entropy(logits_eos, ids[rows, eos_pos])}
    first = torch.tensor([j == 0 for m in marks for j in range(len(m["answer"]))])
    losses["answer_acc"] = (logits_ans.argmax(-1) == ids[rows, ans_pos])[first].float().mean()
    losses["turn_acc"] = (logits_ans.argmax(-1) == ids[rows, ans_pos]).float().mean()
    total = losses["lm"] + 0.2 * losses["eos"]
    if cfg.attn_weight > 0:
        sup = attention_losses(model, capture, batch, cfg)
        losses.update(sup)
        total = total + cfg.attn_weight * (sup["gather"] + sup["retrieve"] + sup["route"]) \
            + cfg.motion_weight * sup["motion"]
    losses["total"] = total
    return losses


def attention_losses(model: nn.Module, capture: ts._Capture, batch: dict[str, Any],
                     cfg: VideoTrainConfig) -> dict[str, torch.Tensor]:
    """-log attention mass of the circuit in the module docstring (``train_synthetic.attention_log_mass``)."""
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    B, L = ids.shape
    n_heads = max(1, min(cfg.attn_heads, model.config.text_config.num_attention_heads))
    marks, samples = batch["marks"], batch["samples"]
    # where each kept video token sits in its row, and which (frame, cell) it is
    video_pos = [torch.nonzero(ids[i] == model.config.video_token_id).squeeze(1) for i in range(B)]
    rows, anchors, queries, route_t, gather_t, retrieve_t = [], [], [], [], [], []
    m_rows, m_q, m_t = [], [], []
    for i, (m, s) in enumerate(zip(marks, samples)):
        cells = batch["kept_cells"][i]
        for t, turn in enumerate(s.turns):
            rows.append(i)
            anchors.append(m["anchor"][t])
            queries.append(m["query"][t])
            r = torch.zeros(L, dtype=torch.bool)
            r[m["anchor"][t]] = True
            route_t.append(r)
            g = torch.zeros(L, dtype=torch.bool)
            g[m["content"][t]] = True
            gather_t.append(g)
            v = torch.zeros(L, dtype=torch.bool)
            v[video_pos[i]] = torch.from_numpy(turn.target.ravel()[cells])
            retrieve_t.append(v)
        # motion: each object token of a later frame -> the same object's tokens in earlier frames
        obj = s.objects  # (F, n_obj, 144)
        flat = obj.reshape(obj.shape[0], obj.shape[1], -1)
        frame_of = cells // CELLS
        for o in range(obj.shape[1]):
            is_o = flat[:, o].ravel()[cells]  # (kept,) bool
            for k in np.flatnonzero(is_o):
                earlier = is_o & (frame_of < frame_of[k])
                if earlier.any():
                    tgt = torch.zeros(L, dtype=torch.bool)
                    tgt[video_pos[i][torch.from_numpy(earlier)]] = True
                    m_rows.append(i)
                    m_q.append(int(video_pos[i][k]))
                    m_t.append(tgt)
    rows_t, anchors_t, queries_t = torch.tensor(rows), torch.tensor(anchors), torch.tensor(queries)
    st = capture.store
    route = ts.attention_log_mass(model, cfg.route_layer, st[f"attn_in{cfg.route_layer}"], pos, mask, rows_t,
                                  queries_t, torch.stack(route_t), n_heads)
    gather = ts.attention_log_mass(model, cfg.gather_layer, st[f"attn_in{cfg.gather_layer}"], pos, mask, rows_t,
                                   anchors_t, torch.stack(gather_t), n_heads, spread=True)
    rt = torch.stack(retrieve_t)
    has = rt.any(1)
    retrieve = ts.attention_log_mass(model, cfg.attn_layer, st[f"attn_in{cfg.attn_layer}"], pos, mask, rows_t[has],
                                     anchors_t[has], rt[has], n_heads)
    out = {"gather": -gather.mean(), "retrieve": -retrieve.mean(), "route": -route.mean()}
    if m_rows:
        motion = ts.attention_log_mass(model, cfg.gather_layer, st[f"attn_in{cfg.gather_layer}"], pos, mask,
                                       torch.tensor(m_rows), torch.tensor(m_q), torch.stack(m_t), n_heads)
        out["motion"] = -motion.mean()
        out["motion_mass"] = motion.detach().exp().mean()
    else:
        out["motion"] = torch.zeros(())
    out.update({f"{k}_mass": v.detach().exp().mean() for k, v in
                (("gather", gather), ("retrieve", retrieve), ("route", route))})
    return out


# --------------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate(model: nn.Module, feats: FrozenFeatures, tok, pre: FramePreprocessor, cfg: VideoTrainConfig,
             n: int | None = None) -> dict[str, Any]:
    """Greedy first-token accuracy on held-out items (seed 0), rendered directly, all 1,152 tokens, one turn each:
    the token video-qa's generate() would emit first, scored as the gold option's word."""
    was = model.training
    model.eval()
    n = n or cfg.eval_samples
    right: dict[str, list[bool]] = {}
    for lo in range(0, n, cfg.eval_batch):
        samples = [make_video_sample(i, 0, cfg.frames, cfg.min_coverage)
                   for i in range(lo, min(n, lo + cfg.eval_batch))]
        batch = collate(samples, tok, pre)
        hidden, _ = forward(model, feats, batch)
        for i, (m, s) in enumerate(zip(batch["marks"], samples)):
            pred = model.lm_head(hidden[i, m["answer"][0] - 1]).argmax(-1)
            right.setdefault(s.turns[0].kind, []).append(bool(pred == batch["input_ids"][i, m["answer"][0]]))
    model.train(was)
    per = {k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())}
    return {"heldout_acc": round(sum(sum(v) for v in right.values()) / n, 4), "heldout_per_kind": per}


# --------------------------------------------------------------------------------------------------- training


def lr_at(step: int, cfg: VideoTrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def processor_parts(cfg: VideoTrainConfig):
    tok = build_tokenizer(video=True)
    pre = FramePreprocessor.from_dict("llava_next_video", VIDEO_PREPROCESSOR)
    return tok, pre


def train(cfg: VideoTrainConfig, *, fresh: bool = False, progress: bool = True, ship: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training; ship the model to ``cfg.out`` at the last step. Returns the summary."""
    torch.set_num_threads(cfg.threads)
    ts.keep_freed_memory()
    ckpt = Path(cfg.ckpt_dir)
    log_path = ckpt / "log.jsonl"
    tok, pre = processor_parts(cfg)
    model = build_video_model(cfg, tok)
    model.model.vision_tower.requires_grad_(False)
    feats = FrozenFeatures(model)
    heads = nn.Module()  # the image script's checkpoint format holds training-only heads; none here
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    start, elapsed = 0, 0.0
    if not fresh and (ckpt / "state.json").exists():
        state = ts.load_checkpoint(ckpt, model, heads, opt)
        if state["config"] != asdict(cfg):
            raise ValueError(f"checkpoint in {ckpt} was made with another config; pass --fresh to start over\n"
                             f"  checkpoint: {state['config']}\n  now:        {asdict(cfg)}")
        start, elapsed = state["step"], state["elapsed_s"]
        ts._truncate_log(log_path, start)
    else:
        ckpt.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        torch.manual_seed(cfg.seed)
    capture = ts._Capture(model, (cfg.gather_layer, cfg.attn_layer, cfg.route_layer) if cfg.attn_weight > 0 else ())
    model.train()
    t0 = time.perf_counter() - elapsed
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train", disable=not progress)
    last_eval: dict[str, Any] = {}
    try:
        with log_path.open("a") as log:
            for step in bar:
                samples = [make_video_sample(step * cfg.batch_size + i, cfg.train_seed, cfg.frames, cfg.min_coverage,
                                             cfg.max_turns) for i in range(cfg.batch_size)]
                batch = collate(samples, tok, pre, cfg.bg_keep, np.random.default_rng((cfg.seed, step)))
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                losses = step_losses(model, feats, capture, batch, cfg)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                done = step + 1
                rec = {"step": done, "lr": lr_at(step, cfg), "grad_norm": float(grad_norm),
                       "seq_len": int(batch["input_ids"].shape[1]), "time_s": round(time.perf_counter() - t0, 1),
                       **{k: round(float(v), 5) for k, v in losses.items()}}
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    last_eval = evaluate(model, feats, tok, pre, cfg)
                    rec.update(last_eval)
                    tqdm.write(f"step {done}: held-out acc {last_eval['heldout_acc']:.3f} "
                               + " ".join(f"{k}={v:.2f}" for k, v in last_eval["heldout_per_kind"].items()))
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("lm", "turn_acc", "retrieve_mass", "motion_mass")
                                 if k in rec})
                if done % cfg.ckpt_every == 0 or done == end:
                    ts.save_checkpoint(ckpt, done, model, heads, opt, cfg,
                                       {"elapsed_s": time.perf_counter() - t0, **last_eval})
    finally:
        capture.remove()
    summary = {"steps": end, "train_time_s": round(time.perf_counter() - t0, 1), **last_eval}
    if ship and end == cfg.steps:
        ship_model(model, tok, Path(cfg.out), {"config": asdict(cfg), **summary})
    return summary


def ship_model(model: nn.Module, tok, out: Path, summary: dict[str, Any]) -> None:
    """Save the model (safetensors), tokenizer, chat template and video preprocessor config to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR, indent=1) + "\n")
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    defaults = VideoTrainConfig()
    for f in fields(VideoTrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--no-ship", action="store_true", help="do not write the final model to --out")
    p.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) at this step; resume later")
    args = vars(p.parse_args(argv))
    fresh, no_ship, stop_after = args.pop("fresh"), args.pop("no_ship"), args.pop("stop_after")
    summary = train(VideoTrainConfig(**args), fresh=fresh, ship=not no_ship, stop_after=stop_after)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
