"""The vLLM plugin on InternVL (HF-native format, vLLM's ``interns1`` implementation; 1-D RoPE), against
transformers: a tiny random checkpoint saved with its tokenizer and processor. Images of different aspect ratios get
different tile counts (thumbnail included: one span each); a video's frames are separate ``<img>...</img>`` blocks,
images to transformers' processor. Images and videos go through one engine per config, in one batch. Kept indices,
the top-5 first-token log-probabilities (they depend on every kept token's position) and greedy answers must equal
``vtprune.prune`` in transformers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv (scripts/setup_vllm.sh)")

import vtprune  # noqa: E402
from vtprune.integrations.vllm import offline  # noqa: E402
from vtprune.testing.checkpoints import save_internvl  # noqa: E402

IMAGE_PROMPT = "<|im_start|>user\n<IMG_CONTEXT>\nw{a} w{b}<|im_end|>\n<|im_start|>assistant\n"
VIDEO_PROMPT = "<|im_start|>user\n<video>\nw{a} w{b}<|im_end|>\n<|im_start|>assistant\n"
SIZES = [(64, 128), (192, 64), (96, 96), (128, 300)]  # (h, w): 3, 4, 1 and 4 tiles (+ thumbnail when > 1)
CONFIGS = [{"method": "kcenter", "ratio": 0.5}, {"method": "pool", "keep": 5, "budget": "per_image"},
           # vision-tower signals ([CLS] attention, keys, [CLS] state, the pixel-shuffled projector input)
           {"method": "visionzip", "keep": 6}, {"method": "zeroth_order", "ratio": 0.5}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_internvl(tmp_path_factory.mktemp("internvl") / "internvl")


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def cases():
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        a, b = rng.integers(6, 400, 2)
        if i % 4 == 3:  # a video of 3 frames
            h, w = SIZES[i % 2]
            out.append(("video", rng.integers(0, 255, (3, h, w, 3), dtype=np.uint8), VIDEO_PROMPT.format(a=a, b=b)))
        else:
            h, w = SIZES[i % len(SIZES)]
            out.append(("image", Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
                        IMAGE_PROMPT.format(a=a, b=b)))
    return out


def _reference(hf, config, cases):
    """Per case: the kept media tokens (indices into its placeholders), and the top-5 first-token log-probs."""
    model, processor = hf
    out = []
    with vtprune.prune(model, config["method"], keep=config.get("keep"), ratio=config.get("ratio"),
                       budget=config.get("budget", "per_frame")) as handle, torch.inference_mode():
        for kind, media, text in cases:
            inputs = processor(text=[text], return_tensors="pt", **{f"{kind}s": [media]})
            lp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
            kept = torch.isin(pos, handle.stats.kept_positions[0]).nonzero()[:, 0]
            top = lp.topk(5)
            out.append((int(pos.numel()), kept.tolist(), dict(zip(top.indices.tolist(), top.values.tolist()))))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=["-".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS])
def test_same_kept_tokens_positions_and_answers_as_hf(config, checkpoint, hf, cases, tmp_path):
    log = tmp_path / "kept.jsonl"
    llm = offline.engine(str(checkpoint), {**config, "record": str(log)}, limit_mm_per_prompt={"image": 1, "video": 1})
    outs = offline.generate(llm, [{"prompt": t, "multi_modal_data": {kind: m}} for kind, m, t in cases], logprobs=5)
    del llm
    ref = _reference(hf, config, cases)
    rows = [json.loads(line) for line in log.read_text().splitlines()]  # a video's frames one record each
    records = {m: iter([r for r in rows if r["modality"] == m]) for m in ("image", "video")}  # vLLM groups by modality
    counts = set()
    for i, ((kind, _, _), (n, idx, top), o) in enumerate(zip(cases, ref, outs)):
        got_idx, got_n, frames = [], 0, 3 if kind == "video" else 1
        for _ in range(frames):
            r = next(records[kind])
            got_idx += [got_n + j for j in r["kept"]]
            got_n += r["tokens"]
        assert got_n == n, f"case {i}: vLLM encoded {got_n} tokens, transformers {n}"
        assert got_idx == idx, f"case {i} ({kind}): vLLM kept {got_idx}, transformers {idx}"
        counts.add(len(idx))
        got = o.outputs[0]
        assert got.token_ids[0] == max(top, key=top.get)
        for tok, lp in top.items():
            assert math.isclose(got.logprobs[0][tok].logprob, lp, abs_tol=1e-4), (i, tok, got.logprobs[0], top)
    if "ratio" in config:
        assert len(counts) > 2  # tile counts differ, so do the kept counts
