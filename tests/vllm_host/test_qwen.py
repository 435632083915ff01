"""The vLLM plugin on Qwen2.5-VL, Qwen2-VL and Qwen3-VL (M-RoPE), against transformers: tiny random checkpoints saved
with their tokenizer and processor; wide, tall and square images (different grids, so different kept counts under a
ratio). Kept indices, first-token log-probabilities (they depend on every kept token's (t, h, w) position) and greedy
answers must equal ``vtprune.prune`` in transformers, for methods reading the token sequence and methods reading the
vision tower (attention received, keys, the merger's input)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv (scripts/setup_vllm.sh)")

import vtprune  # noqa: E402
from vtprune.integrations.vllm import offline  # noqa: E402
from vtprune.testing.checkpoints import save_qwen  # noqa: E402

PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>w{a} w{b} w{c}<|im_end|>\n"
          "<|im_start|>assistant\n")
SIZES = [(56, 112), (168, 56), (84, 84), (112, 224), (196, 84)]  # (h, w) pixels: wide, tall, square ...
CONFIGS = [("qwen2_5_vl", {"method": "kcenter", "keep": 4}), ("qwen2_5_vl", {"method": "random", "ratio": 0.5}),
           ("qwen2_vl", {"method": "kcenter", "ratio": 0.5}), ("qwen2_vl", {"method": "pool", "ratio": 0.75}),
           ("qwen3_vl", {"method": "kcenter", "ratio": 0.5}), ("qwen3_vl", {"method": "random", "keep": 5}),
           ("qwen3_vl", {"method": "pool", "keep": 6}),
           # vision-tower signals: rotated q / k of vLLM's packed ViT attention, the merger's input
           ("qwen2_5_vl", {"method": "visionzip", "keep": 6, "vit_layer": 1}),  # a window-attention block
           ("qwen2_5_vl", {"method": "zeroth_order", "ratio": 0.5}),
           ("qwen2_vl", {"method": "mmr", "keep": 5}), ("qwen2_vl", {"method": "cls_attention", "ratio": 0.5}),
           ("qwen3_vl", {"method": "kcenter", "variant": "todre", "keep": 6}),
           ("qwen3_vl", {"method": "visionzip", "ratio": 0.5})]
FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {family: save_qwen(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def models(checkpoints):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return {f: (AutoModelForImageTextToText.from_pretrained(p).eval(), AutoProcessor.from_pretrained(p))
            for f, p in checkpoints.items()}


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(0)
    from PIL import Image

    out = []
    for i in range(20):
        h, w = SIZES[i % len(SIZES)]
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        a, b, c = rng.integers(6, 400, 3)
        out.append((img, PROMPT.format(a=a, b=b, c=c)))
    return out


def _media_index(media_pos, kept_pos):
    """Kept media tokens as indices into the item's media tokens (what the plugin records), from prompt positions."""
    return torch.isin(media_pos, kept_pos).nonzero()[:, 0].tolist()


def _reference(hf, config, cases):
    model, processor = hf
    opts = {k: v for k, v in config.items() if k not in ("method", "keep", "ratio")}
    out = []
    with vtprune.prune(model, vtprune.method(config["method"], **opts), keep=config.get("keep"),
                       ratio=config.get("ratio")) as handle, torch.inference_mode():
        for img, text in cases:
            inputs = processor(images=[img], text=[text], return_tensors="pt")
            lp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            image_pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
            idx = _media_index(image_pos, handle.stats.kept_positions[0])
            tok = int(lp.argmax())
            out.append((int(image_pos.numel()), idx, tok, float(lp[tok])))
    return out


@pytest.mark.parametrize(("family", "config"), CONFIGS,
                         ids=[f + ":" + "-".join(f"{k}={v}" for k, v in c.items()) for f, c in CONFIGS])
def test_same_kept_tokens_positions_and_answers_as_hf(family, config, checkpoints, models, cases, tmp_path):
    ckpt, hf = checkpoints[family], models[family]
    log = tmp_path / "kept.jsonl"
    llm = offline.engine(str(ckpt), {**config, "record": str(log)}, limit_mm_per_prompt={"image": 1, "video": 0})
    outs = offline.generate(llm, [{"prompt": t, "multi_modal_data": {"image": im}} for im, t in cases])
    del llm
    kept = offline.read_kept(log, tokens=True)  # in encoding order: the requests' order (one image each)
    ref = _reference(hf, config, cases)
    assert len(kept) == len(ref)
    counts = set()
    for i, ((n, idx, tok, lp), o, (_, got_idx, got_n)) in enumerate(zip(ref, outs, kept)):
        assert got_n == n, f"image {i}: vLLM encoded {got_n} tokens, transformers {n}"
        assert got_idx == idx, f"image {i} ({cases[i][0].size}): vLLM kept {got_idx}, transformers {idx}"
        counts.add(len(idx))
        got = o.outputs[0]
        assert got.token_ids[0] == tok
        assert math.isclose(got.logprobs[0][tok].logprob, lp, abs_tol=1e-4), (i, got.logprobs[0][tok].logprob, lp)
    if "ratio" in config:
        assert len(counts) > 1  # different image sizes kept different counts


VIDEO_PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>w7 w8<|im_end|>\n"
                "<|im_start|>assistant\n")


VIDEOS = [("qwen2_5_vl", {"method": "kcenter", "keep": 3}),
          ("qwen2_5_vl", {"method": "random", "ratio": 0.5, "budget": "per_image"}),
          ("qwen3_vl", {"method": "kcenter", "keep": 3}),
          ("qwen2_vl", {"method": "visionzip", "keep": 3})]  # ViT signals of a video: a segment per temporal patch


@pytest.mark.parametrize(("family", "config"), VIDEOS, ids=["qwen2_5_vl-per-frame", "qwen2_5_vl-per-video",
                                                            "qwen3_vl-per-frame", "qwen2_vl-visionzip-per-frame"])
def test_video_same_kept_tokens_and_positions_as_hf(family, config, checkpoints, models, tmp_path):
    """Videos: per-frame spans (or the video pooled). Qwen2.5-VL: one run of placeholders, temporal M-RoPE positions
    scaled by seconds per grid x tokens per second (transformers' processor assumes 24 fps when given none; vLLM is
    told the same). Qwen3-VL: every frame a block of its own after its timestamp, placed like an image."""
    model, processor = models[family]
    rng = np.random.default_rng(1)
    side = 64 if family == "qwen3_vl" else 56  # a whole number of merged patches (32 px / 28 px)
    videos = [rng.integers(0, 255, (4, h, w, 3), dtype=np.uint8) for h, w in ((side, 2 * side), (2 * side, side))]
    meta = {"fps": 24.0, "frames_indices": [0, 1, 2, 3], "total_num_frames": 4}
    opts = {k: v for k, v in config.items() if k not in ("method", "keep", "ratio", "budget")}
    ref = []
    with vtprune.prune(model, vtprune.method(config["method"], **opts), keep=config.get("keep"),
                       ratio=config.get("ratio"), budget=config.get("budget", "per_frame")) as handle, \
            torch.inference_mode():
        for frames in videos:
            inputs = processor(videos=[frames], text=[VIDEO_PROMPT], return_tensors="pt", do_sample_frames=False,
                               video_metadata=[meta])
            lp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            pos = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[:, 0]
            ref.append((_media_index(pos, handle.stats.kept_positions[0]), int(lp.argmax()), float(lp.max())))
    log = tmp_path / "kept.jsonl"
    llm = offline.engine(str(checkpoints[family]), {**config, "record": str(log)},
                         limit_mm_per_prompt={"image": 0, "video": 1})
    meta = {**meta, "do_sample_frames": False, "duration": 4 / 24}
    outs = offline.generate(llm, [{"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": (v, meta)}} for v in videos])
    del llm
    kept = offline.read_kept(log)
    assert [k for _, k in kept] == [idx for idx, _, _ in ref]
    if family == "qwen3_vl":  # one block per temporal patch, each cut to its own kept count
        n_video = [sum(t == model.config.video_token_id for t in o.prompt_token_ids) for o in outs]
        assert n_video == [2 * 3] * 2  # 4 frames = 2 temporal patches (blocks), 3 kept in each
    for (_, tok, lp), o in zip(ref, outs):
        got = o.outputs[0]
        assert got.token_ids[0] == tok
        assert math.isclose(got.logprobs[0][tok].logprob, lp, abs_tol=1e-4), (got.logprobs[0][tok].logprob, lp)


def test_frame_blocks_shrink_each_and_refuse_a_pooled_budget(checkpoints):
    """Qwen3-VL's video placeholder is one block per temporal patch, text between: each block keeps its frame's
    count; a budget pooled over the video cannot give the blocks their counts before the encoder runs."""
    from transformers import AutoConfig
    from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

    from vtprune.integrations.vllm.config import Plan, PluginConfig, steps_for
    from vtprune.integrations.vllm.families import VllmQwen3VL
    from vtprune.integrations.vllm.models import _shrunk

    cfg = AutoConfig.from_pretrained(checkpoints["qwen3_vl"])
    V, S, E = cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    seq = [5, 5, S] + [V] * 8 + [E, 5, 5, S] + [V] * 8 + [E]
    update = PromptReplacement(modality="video", target=[V],
                               replacement=lambda i: PromptUpdateDetails.select_token_id(seq, V))

    def plan(raw):
        c, a = PluginConfig.parse(raw), VllmQwen3VL(cfg)
        return Plan(c, a, steps_for(c, a))

    out = _shrunk(update, plan({"method": "kcenter", "keep": 3}), V, lambda i: 2)(0)
    assert out.full == [5, 5, S] + [V] * 3 + [E, 5, 5, S] + [V] * 3 + [E]
    assert out.is_embed is not None
    with pytest.raises(ValueError, match="per_frame"):
        _shrunk(update, plan({"method": "kcenter", "ratio": 0.5, "budget": "per_image"}), V, lambda i: 2)(0)
