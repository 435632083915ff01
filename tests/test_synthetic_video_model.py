"""The trained synthetic video model (``models/synthetic-llava-video``, ``scripts/train_synthetic_video.py``).

Checks that what training feeds is what ``vtprune video-qa`` feeds (token for token, pixel for pixel), that the
token labels training supervises attention with are the drawn objects, that the shipped checkpoint is a stock
``LlavaNextVideoForConditionalGeneration`` whose training.json records the script's defaults, and that
``vtprune video-qa`` answers held-out mp4 questions with it, unpruned and pruned.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vtprune import synthetic_video as sv
from vtprune.video_qa import format_question

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "synthetic-llava-video"


@pytest.fixture(scope="module")
def train_video():
    """scripts/train_synthetic_video.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_synthetic_video",
                                                  ROOT / "scripts" / "train_synthetic_video.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_synthetic_video"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def builder():
    from vtprune.video import VideoInputBuilder

    if not (SHIPPED / "model.safetensors").exists():
        pytest.fail(f"the shipped model is missing from {SHIPPED}; run scripts/train_synthetic_video.py")
    return VideoInputBuilder.from_pretrained(SHIPPED)


def test_video_vocabulary_covers_every_prompt_and_answer(builder):
    tok = builder.tokenizer
    for i in range(60):
        item, _ = sv.make_item(i, 0)
        ids = tok(format_question(dataclasses.asdict(item))).input_ids
        assert tok.unk_token_id not in ids, format_question(dataclasses.asdict(item))
        assert tok.convert_tokens_to_ids(item.answer) != tok.unk_token_id
    assert tok.tokenize("USER: <video><video>\nWhich colour moves left?") == [
        "USER:", "<video>", "<video>", "Which", "colour", "moves", "left?"]


def test_training_rows_are_what_video_qa_feeds(train_video, builder):
    """First turn of a training row = VideoInputBuilder's prompt ids + answer + </s>; same pixels."""
    cfg = train_video.VideoTrainConfig()
    tok, pre = train_video.processor_parts(cfg)
    for index in range(5):  # one item of each kind
        item, _ = sv.make_item(index, 0)
        sample = train_video.make_video_sample(index, 0, cfg.frames, cfg.min_coverage)
        batch = train_video.collate([sample], tok, pre)
        clip = argparse.Namespace(frames=sample.frames, timestamps=np.zeros(cfg.frames))
        inputs = builder(clip, format_question({"question": item.question, "options": item.options}))
        ids = inputs["input_ids"][0].tolist()
        assert batch["input_ids"][0].tolist() == ids + tok.convert_tokens_to_ids([item.answer, "</s>"])
        assert ids.count(builder.video_token_id) == cfg.frames * 144
        assert torch.equal(batch["pixel_values_videos"], inputs["pixel_values_videos"])


def test_object_tokens_are_the_drawn_objects(train_video):
    """object_cover (geometry) against the stretched frame's pixels: the share of each 28 px cell in the object's
    colour (after PIL's bicubic stretch, which blurs edges) tracks the computed cover."""
    from PIL import Image

    item, tracks = sv.make_item(3, 0)
    frames = sv.render(tracks, item.frames, 160, 120)
    ids = np.array([0, 13, 31])
    cover = train_video.object_cover(tracks, ids)  # (3, n_obj, 144)
    assert cover.sum() > 0
    for fi, f in enumerate(ids):
        big = np.asarray(Image.fromarray(frames[f]).resize((336, 336), Image.BICUBIC)).astype(int)
        for o, t in enumerate(tracks):
            near = (np.abs(big - np.array(sv.COLOURS[t.colour])).sum(-1) < 60)
            share = near.reshape(12, 28, 12, 28).mean((1, 3)).ravel()
            assert np.abs(share - cover[fi, o]).max() < 0.25, (f, t.colour)
            if f < t.start:
                assert cover[fi, o].sum() == 0


def test_forward_used_in_training_is_the_models(train_video, builder):
    """The training forward (frozen ViT without its unused last layer, pooled, projected, scattered) gives the
    stock model's logits."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(SHIPPED).eval()
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    cfg = train_video.VideoTrainConfig()
    tok, pre = train_video.processor_parts(cfg)
    sample = train_video.make_video_sample(1, 0, cfg.frames, cfg.min_coverage)
    batch = train_video.collate([sample], tok, pre)
    item, _ = sv.make_item(1, 0)
    clip = argparse.Namespace(frames=sample.frames, timestamps=np.zeros(cfg.frames))
    inputs = builder(clip, format_question({"question": item.question, "options": item.options}))
    with torch.no_grad():
        hidden, _ = train_video.forward(model, train_video.FrozenFeatures(model), batch)
        ref = model(**inputs).logits[0]
    n = ref.shape[0]
    torch.testing.assert_close(model.lm_head(hidden[0, :n]), ref, rtol=1e-4, atol=1e-4)


def test_shipped_checkpoint_is_stock_and_records_the_script_defaults(train_video):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(SHIPPED)
    assert cfg.model_type == "llava_next_video" and cfg.architectures == ["LlavaNextVideoForConditionalGeneration"]
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.spatial_pool_stride) == (336, 14, 2)
    assert cfg.vision_feature_layer == -2 and cfg.spatial_pool_mode == "average"
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20e6
    assert not list(SHIPPED.glob("*.bin")) and not list(SHIPPED.glob("*.pt"))  # no pickle
    pre = json.loads((SHIPPED / "video_preprocessor_config.json").read_text())
    assert pre["do_center_crop"] is False and pre["size"] == {"height": 336, "width": 336}
    recorded = json.loads((SHIPPED / "training.json").read_text())
    assert recorded["config"] == dataclasses.asdict(train_video.VideoTrainConfig())
    assert recorded["steps"] == recorded["config"]["steps"]
    # the recorded held-out accuracy (vtprune video-qa on 200 mp4s): every kind well above chance (0.25; 0.33)
    by_kind = recorded["heldout_video_qa"]["accuracy_by_kind"]
    assert set(by_kind) == set(sv.KINDS) and min(by_kind.values()) >= 0.4, by_kind
    assert recorded["heldout_video_qa"]["n"] == 200 and recorded["heldout_video_qa"]["accuracy"] >= 0.75


def test_video_qa_answers_heldout_questions_unpruned_and_pruned(tmp_path):
    """`vtprune video-qa` on held-out mp4s (seed 0): every reply names an option; unpruned, the shape and
    direction questions (1.00 on the 200 recorded) are right; evs at 0.75 keeps int(1152 * 0.25) tokens."""
    from vtprune import video_qa

    sv.generate(tmp_path / "data", 10, seed=0, kinds=["shape_of", "direction_of"])
    parser = video_qa.add_arguments(argparse.ArgumentParser())
    common = ["--model", str(SHIPPED), "--data", str(tmp_path / "data" / "annotations.json"), "--threads", "1",
              "--no-progress", "--max-new-tokens", "3"]
    full = video_qa.run(parser.parse_args([*common, "--out", str(tmp_path / "full")]))
    evs = video_qa.run(parser.parse_args([*common, "--out", str(tmp_path / "evs"), "--method", "evs",
                                          "--ratio", "0.75"]))
    assert full["visual_before"] == full["visual_after"] == 1152
    assert evs["visual_before"] == 1152 and evs["visual_after"] == 288
    for out in ("full", "evs"):
        records = [json.loads(line) for line in (tmp_path / out / "predictions.jsonl").read_text().splitlines()]
        assert len(records) == 10 and all(r["parsed"] is not None for r in records), records
    assert full["accuracy_by_kind"]["shape_of"] >= 0.8 and full["accuracy_by_kind"]["direction_of"] >= 0.8, full
