"""The offline synthetic VQA benchmark: generator, tokenizer/processor, shipped model, training script."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from vtprune.synthetic import scenes
from vtprune.synthetic.eval import evaluate
from vtprune.synthetic.tokenizer import build_processor, build_tokenizer, prompt

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "synthetic-llava"


def _digest(s: scenes.Sample) -> str:
    return hashlib.sha1(s.image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def train_module():
    """scripts/train_synthetic.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_synthetic", ROOT / "scripts" / "train_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_synthetic"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------- generator

def test_generator_is_deterministic():
    a, b = scenes.make_sample(7), scenes.make_sample(7)
    assert _digest(a) == _digest(b) and (a.question, a.answer, a.objects) == (b.question, b.answer, b.objects)
    assert np.array_equal(a.patch_object, b.patch_object)
    assert [_digest(s) for s in scenes.heldout(20)] == [_digest(s) for s in scenes.heldout(20)]
    assert [_digest(s) for s in scenes.heldout(5, offset=3)] == [_digest(s) for s in scenes.heldout(8)[3:]]
    assert _digest(scenes.make_sample(7)) != _digest(scenes.make_sample(8))


def test_splits_are_disjoint():
    train = {_digest(s) for s in scenes.iter_samples("train", 0, 300)}
    held = {_digest(s) for s in scenes.heldout(300)}
    assert len(train) == len(held) == 300 and not train & held
    with pytest.raises(ValueError, match="split"):
        scenes.make_sample(0, "test")


def test_question_types_and_answers_are_balanced():
    samples = [scenes.make_sample(i) for i in range(1000)]
    assert Counter(s.qtype for s in samples) == {t: 200 for t in scenes.QUESTION_TYPES}
    expected = {"colour": scenes.COLOUR_NAMES, "shape": scenes.SHAPES, "position": scenes.REGIONS,
                "count": scenes.COUNT_WORDS, "exists": ("yes", "no")}
    for qtype, values in expected.items():
        counts = Counter(s.answer for s in samples if s.qtype == qtype)
        assert set(counts) == set(values), qtype
        assert max(counts.values()) < 3 * min(counts.values()), (qtype, counts)  # no answer prior to exploit


def _answer_from_objects(s: scenes.Sample) -> str:
    """Recompute the answer from the scene alone (an independent reading of the question)."""
    w = s.question.split()
    objs = s.objects
    if s.qtype in ("colour", "shape"):
        (obj,) = [o for o in objs if o.region == scenes.REGIONS.index(w[-2])]
        return obj.colour if s.qtype == "colour" else obj.shape
    if s.qtype == "position":
        (obj,) = [o for o in objs if (o.colour, o.shape) == (w[3], w[4])]
        return scenes.REGIONS[obj.region]
    if s.qtype == "count":
        noun = w[2]
        if noun == "shapes":
            return str(len(objs))
        if noun in scenes.COLOUR_NAMES:
            return str(sum(o.colour == noun for o in objs))
        return str(sum(o.shape + "s" == noun for o in objs))
    return "yes" if any((o.colour, o.shape) == (w[3], w[4]) for o in objs) else "no"


def test_answers_follow_from_the_scene():
    for s in [scenes.make_sample(i) for i in range(300)] + scenes.heldout(100):
        assert _answer_from_objects(s) == s.answer, (s.question, s.answer, s.objects)
        assert len(s.objects) <= scenes.MAX_OBJECTS
        assert len({o.region for o in s.objects}) == len(s.objects)  # at most one object per region


def test_follow_up_questions_are_distinct_and_correct():
    differ = 0
    for i in range(200):
        s = scenes.make_sample(i)
        extra = scenes.follow_up_questions(s, 3, seed=0)
        assert len({q for q, _, _ in extra} | {s.question}) == 4  # no repeats, never the sample's own question
        assert extra == scenes.follow_up_questions(s, 3, seed=0)
        differ += extra != scenes.follow_up_questions(s, 3, seed=1)
        for q, a, t in extra:
            assert _answer_from_objects(dataclasses.replace(s, question=q, answer=a, qtype=t)) == a
    assert differ > 150  # the seed matters (tiny scenes can coincide)


def test_relevant_objects_are_the_ones_the_answer_depends_on():
    for i in range(200):
        s = scenes.make_sample(i)
        for q, a, t in [(s.question, s.answer, s.qtype), *scenes.follow_up_questions(s, 6, seed=0)]:
            rel = scenes.relevant_objects(q, s.objects)
            assert rel == sorted(set(rel))
            if t == "count":
                assert len(rel) == int(a)
            elif t == "exists":
                assert bool(rel) == (a == "yes")
            elif t == "position":
                assert [scenes.REGIONS[s.objects[j].region] for j in rel] == [a]
            else:
                assert [getattr(s.objects[j], t) for j in rel] == [a]
    with pytest.raises(ValueError, match="unknown question"):
        scenes.relevant_objects("why ?", ())


def test_patch_labels_match_drawn_pixels():
    for s in [scenes.make_sample(i) for i in range(40)]:
        px = np.asarray(s.image, np.int16)
        assert s.image.size == (336, 336) and s.patch_object.shape == (24, 24)
        bg = s.patch_object == -1
        assert bg.mean() > 0.85  # pruning matters: most patches are background
        # Every object colour has a channel >= 165 and the grey background is <= 98, so object pixels are
        # exactly those far from the background's median colour.
        grey = np.median(px.reshape(-1, 3), axis=0)
        is_obj = np.abs(px - grey).max(-1) > 40
        frac = is_obj.reshape(scenes.GRID, scenes.PATCH, scenes.GRID, scenes.PATCH).mean(axis=(1, 3))
        np.testing.assert_allclose(frac, s.patch_coverage, atol=1e-9)  # no object pixel outside the labels
        for i, obj in enumerate(s.objects):
            rows, cols = np.nonzero(s.patch_object == i)
            assert len(rows) >= 4 and s.patch_coverage[rows, cols].max() > 0.6, obj
            assert {scenes.region_of_patch(r, c) for r, c in zip(rows, cols)} == {obj.region}
            x0, y0, x1, y1 = obj.box
            box = is_obj[y0:y1, x0:x1]
            assert box.any() and is_obj.sum() >= box.sum()
            target = np.array(scenes.COLOURS[obj.colour])
            assert np.abs(px[y0:y1, x0:x1][box].mean(0) - target).max() < 20, obj  # colour jitter is +-15
            assert (s.patch_colour[rows, cols] == scenes.COLOUR_NAMES.index(obj.colour) + 1).all()
            assert (s.patch_shape[rows, cols] == scenes.SHAPES.index(obj.shape) + 1).all()
        assert (s.patch_colour[bg] == 0).all() and (s.patch_shape[bg] == 0).all()


# --------------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_without_unknown_words():
    tok = build_tokenizer()
    for s in scenes.heldout(50):
        ids = tok(prompt(s.question)).input_ids
        assert tok.unk_token_id not in ids and ids[0] == tok.bos_token_id
        assert tok.decode(tok(s.question).input_ids, skip_special_tokens=True) == s.question
        assert tok.convert_tokens_to_ids(s.answer) != tok.unk_token_id
    assert tok.tokenize("USER: <image>\ntop-left ?") == ["USER:", "<image>", "top-left", "?"]


def test_processor_expands_image_to_576_tokens_and_matches_training_collate(train_module):
    proc = build_processor()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle ?"}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == prompt("is there a red circle ?")
    samples = scenes.heldout(3)
    inputs = proc(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                  padding=True, return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs.input_ids == image_id).sum(1).tolist() == [576] * 3
    assert inputs.pixel_values.shape == (3, 3, 336, 336)
    batch = train_module.collate(samples, proc.tokenizer)
    assert torch.equal(batch["pixel_values"], inputs.pixel_values)
    for row, s in enumerate(samples):  # training rows = processor rows + answer + </s>
        prompt_ids = inputs.input_ids[row][inputs.attention_mask[row].bool()]
        train_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        answer_ids = proc.tokenizer.convert_tokens_to_ids([s.answer, "</s>"])
        assert train_ids.tolist() == prompt_ids.tolist() + answer_ids


# --------------------------------------------------------------------------------------------------- shipped model

@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not (SHIPPED / "model.safetensors").exists():
        pytest.fail(f"the shipped model is missing from {SHIPPED}; run scripts/train_synthetic.py")
    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(SHIPPED, local_files_only=True)


def test_shipped_model_is_llava_geometry_and_small(shipped):
    model, proc = shipped
    cfg = model.config
    assert cfg.vision_config.model_type == "clip_vision_model"
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.text_config.model_type == "llama"
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 50e6
    assert not list(SHIPPED.glob("*.bin")) and not list(SHIPPED.glob("*.pt"))  # no pickle
    assert proc.tokenizer.padding_side == "left"


# Chance accuracy per question type (answers are balanced by construction: see scenes.py).
CHANCE = {"colour": 1 / len(scenes.COLOUR_NAMES), "shape": 1 / len(scenes.SHAPES), "position": 1 / len(scenes.REGIONS),
          "count": 1 / len(scenes.COUNT_WORDS), "exists": 1 / 2}


def test_shipped_model_answers_heldout_questions(shipped):
    """Processor + generate() reproduce the held-out accuracy the training run recorded (>= 95%, the issue's bar).

    training.json's figure comes from the training loop's own forward on ``heldout(1000)``; this re-measures it on
    the first 200 of those samples through the public path (processor, chat template, left padding, generate).
    """
    model, proc = shipped
    recorded = json.loads((SHIPPED / "training.json").read_text())
    res = evaluate(model, proc, scenes.heldout(200), batch_size=50)
    assert recorded["heldout_acc"] >= 0.95, recorded
    assert res.accuracy >= 0.9, res.to_dict()
    # Every question type well above its chance level (count, the hardest, is ~0.8 against 0.2).
    for qtype, acc in res.per_type.items():
        assert acc >= CHANCE[qtype] + 0.4, (qtype, acc, CHANCE[qtype])
    assert abs(res.accuracy - recorded["heldout_acc"]) <= 0.04, (res.to_dict(), recorded["heldout_acc"])


def test_generate_matches_forward_argmax(shipped):
    """evaluate() (processor + generate) and the training-time forward read the same answer position."""
    model, proc = shipped
    samples = scenes.heldout(6, offset=900)
    res = evaluate(model, proc, samples, batch_size=6)
    inputs = proc(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                  padding=True, return_tensors="pt")
    assert inputs.attention_mask[:, 0].min() == 0  # the batch really is left padded
    position_ids = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**inputs, position_ids=position_ids).logits[:, -1]
    assert proc.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()) == res.predictions


# --------------------------------------------------------------------------------------------------- training

def _tiny_config(train_module, tmp_path: Path, **kw):
    spec = train_module.ModelSpec(vit_hidden=16, vit_layers=2, vit_heads=2, llm_hidden=16, llm_layers=1,
                                  llm_heads=2, llm_kv_heads=1, llm_intermediate=32)
    base = dict(out=str(tmp_path / "model"), ckpt_dir=str(tmp_path / "ckpt"), steps=3, vision_steps=1, batch_size=2,
                warmup=1, eval_every=2, eval_samples=4, eval_batch=4, ckpt_every=1, threads=1, spec=spec,
                gather_layer=0, attn_layer=0, route_layer=0, curriculum_steps=1)
    return train_module.TrainConfig(**{**base, **kw})


def test_training_smoke_resume_and_ship(train_module, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from safetensors.torch import load_file

    cfg = _tiny_config(train_module, tmp_path / "a")
    summary = train_module.train(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "a" / "ckpt" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["total"]) for r in log)
    # Step 1 is the vision stage (no LLM loss), steps 2-3 the LLM stage with retrieval supervision.
    assert "lm" not in log[0] and {"lm", "retrieve", "route", "gather"} <= log[1].keys()
    assert "heldout_acc" in log[-1] and summary["steps"] == 3
    model = LlavaForConditionalGeneration.from_pretrained(cfg.out, local_files_only=True)
    assert not any(k.startswith("heads") for k in load_file(Path(cfg.out) / "model.safetensors"))
    AutoProcessor.from_pretrained(cfg.out, local_files_only=True)

    # Interrupted after step 1 and resumed: the same weights as the uninterrupted run.
    cfg_b = _tiny_config(train_module, tmp_path / "b")
    train_module.train(cfg_b, progress=False, stop_after=1)
    assert not Path(cfg_b.out).exists()  # an unfinished run ships nothing
    train_module.train(cfg_b, progress=False)
    resumed = LlavaForConditionalGeneration.from_pretrained(cfg_b.out, local_files_only=True)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(ValueError, match="another config"):
        train_module.train(_tiny_config(train_module, tmp_path / "b", lr=1e-4), progress=False)
    with pytest.raises(ValueError, match="route_layer"):
        train_module.train(_tiny_config(train_module, tmp_path / "c", route_layer=1), progress=False)


def _retrieval_batch(train_module, n: int = 4):
    tok = build_processor().tokenizer
    samples = [scenes.make_sample(i) for i in range(n)]
    extra = [scenes.follow_up_questions(s, 3, 0) for s in samples]
    return tok, samples, extra, train_module.collate(samples, tok, 0.25, extra, 100, np.random.default_rng(0))


def test_retrieval_targets_mark_anchor_words_and_relevant_patches(train_module):
    tok, samples, extra, batch = _retrieval_batch(train_module)
    for i, s in enumerate(samples):
        turns = [(s.question, s.qtype), *((q, t) for q, _, t in extra[i])]
        anchors = tok.convert_ids_to_tokens(batch["input_ids"][i][batch["anchor_mask"][i]].tolist())
        assert len(anchors) == len(turns) == int(batch["query_mask"][i].sum())
        for t, ((q, qtype), word) in enumerate(zip(turns, anchors)):
            words = q.split()
            if qtype in ("colour", "shape"):
                assert word == words[-2] and word in scenes.REGIONS
            elif qtype in ("position", "exists"):
                assert word == words[-2] and word in scenes.SHAPES
            else:  # how many [colour] shapes / <shape>s are there ?
                assert word == words[words.index("are") - 1]
            gathered = tok.convert_ids_to_tokens(batch["input_ids"][i][batch["content_turn"][i] == t + 1].tolist())
            assert word in gathered and "shape" not in gathered and "what" not in gathered
            rel = scenes.relevant_objects(q, s.objects)
            assert torch.equal(batch["relevant"][i, t].view(scenes.GRID, scenes.GRID),
                               torch.from_numpy(np.isin(s.patch_object, rel) & (len(rel) > 0)))


def test_attention_log_mass_matches_the_models_own_attention(train_module):
    """The recomputed attention mass equals the eager attention probabilities of that layer, per head."""
    cfg = train_module.TrainConfig(spec=train_module.ModelSpec(llm_layers=2, llm_kv_heads=2))
    tok, _, _, batch = _retrieval_batch(train_module)
    model = train_module.build_model(cfg.spec, tok, seed=0, attn="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # sharper than the init's near-uniform attention
    capture = train_module._Capture(model, (1,))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=batch["pixel_values"],
                    output_attentions=True, use_cache=False)
        rows, queries = batch["query_mask"].nonzero(as_tuple=True)
        target = torch.rand(len(rows), ids.shape[1], generator=torch.Generator().manual_seed(0)) < 0.3
        args = (model, 1, capture.store["attn_in1"], pos, mask, rows, queries, target, 4)
        got = train_module.attention_log_mass(*args).exp()
        got_spread = train_module.attention_log_mass(*args, spread=True)
    capture.remove()
    probs = out.attentions[1][rows, :4, queries]  # (N, 4, L)
    want = (probs * target[:, None]).sum(-1)
    assert got.shape == (len(rows), 4) and want.max() > 0.3  # sharp enough to tell heads apart
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    visible_target = target[:, None] & (probs > 0)  # the causal mask hides later positions
    want_spread = (probs.clamp(min=1e-30).log() * visible_target).sum(-1) / visible_target.sum(-1)
    torch.testing.assert_close(got_spread, want_spread, atol=1e-3, rtol=1e-4)
