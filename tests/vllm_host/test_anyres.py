"""The vLLM plugin on the AnyRes families, LLaVA-NeXT and LLaVA-OneVision (tiles + an ``image_newline`` per canvas
row, 1-D RoPE), against transformers: tiny random checkpoints saved with their tokenizer and processors; images of
several sizes (1 to 5 tiles, different canvas rows, so different newline counts and, under a ratio, kept counts; a
OneVision canvas large enough to be down-sampled) and OneVision videos (pooled frames + one trailing newline), in
one batch. vLLM fixes an item's placeholder count before selection, so the plugin runs ``newlines="all"``
(transformers is given the same). Kept indices, first-token log-probabilities and greedy answers must equal
``vtprune.prune`` in transformers, for methods reading the ViT's attention, its [CLS] state and the projector
through vLLM's fused layers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv (scripts/setup_vllm.sh)")

import vtprune  # noqa: E402
from vtprune.integrations.vllm import offline  # noqa: E402
from vtprune.testing.checkpoints import save_llava_next, save_llava_onevision  # noqa: E402

IMAGE_PROMPT = "USER: <image>\nw{a} w{b}\nASSISTANT:"
VIDEO_PROMPT = "USER: <video>\nw{a} w{b}\nASSISTANT:"
# (h, w) pixels. No OneVision image fits one tile: its canvas would repeat the base tile token for token, exact ties
# that a greedy selector (kcenter) breaks by float noise, differently in two hosts. The last canvas is down-sampled.
SIZES = {"llava_next": [(60, 130), (130, 60), (50, 50), (100, 100)],
         "llava_onevision": [(60, 130), (130, 60), (100, 110), (220, 230)]}
CONFIGS = [("llava_next", {"method": "cls_attention", "ratio": 0.5}),
           ("llava_next", {"method": "visionzip", "keep": 8}), ("llava_next", {"method": "zeroth_order", "keep": 6}),
           ("llava_onevision", {"method": "cls_attention", "ratio": 0.5}),
           ("llava_onevision", {"method": "kcenter", "keep": 6, "budget": "per_image"})]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("anyres")
    return {"llava_next": save_llava_next(root / "llava_next"),
            "llava_onevision": save_llava_onevision(root / "llava_onevision")}


@pytest.fixture(scope="module")
def models(checkpoints):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return {f: (AutoModelForImageTextToText.from_pretrained(p).eval(), AutoProcessor.from_pretrained(p))
            for f, p in checkpoints.items()}


def _cases(family):
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        a, b = rng.integers(6, 400, 2)
        if family == "llava_onevision" and i % 4 == 3:  # videos of 3 and 4 frames
            out.append(("video", rng.integers(0, 255, (3 + i % 2, 56, 56, 3), dtype=np.uint8),
                        VIDEO_PROMPT.format(a=a, b=b)))
            continue
        h, w = SIZES[family][i % 4]
        out.append(("image", Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
                    IMAGE_PROMPT.format(a=a, b=b)))
    return out


def _reference(hf, config, cases):
    model, processor = hf
    opts = {k: v for k, v in config.items() if k not in ("method", "keep", "ratio", "budget")}
    out = []
    with vtprune.prune(model, vtprune.method(config["method"], **opts), keep=config.get("keep"),
                       ratio=config.get("ratio"), budget=config.get("budget", "per_frame"),
                       newlines="all") as handle, torch.inference_mode():
        for kind, media, text in cases:
            inputs = processor(text=[text], return_tensors="pt", **{f"{kind}s": [media]})
            lp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            token = model.config.video_token_index if kind == "video" else model.config.image_token_index
            pos = (inputs["input_ids"][0] == token).nonzero()[:, 0]
            kept = torch.isin(pos, handle.stats.kept_positions[0]).nonzero()[:, 0]
            tok = int(lp.argmax())
            out.append((int(pos.numel()), kept.tolist(), tok, float(lp[tok])))
    return out


@pytest.mark.parametrize(("family", "config"), CONFIGS,
                         ids=[f + ":" + "-".join(f"{k}={v}" for k, v in c.items()) for f, c in CONFIGS])
def test_same_kept_tokens_positions_and_answers_as_hf(family, config, checkpoints, models, tmp_path):
    cases = _cases(family)
    log = tmp_path / "kept.jsonl"
    limits = {"image": 1, "video": 1} if family == "llava_onevision" else {"image": 1}
    llm = offline.engine(str(checkpoints[family]), {**config, "newlines": "all", "record": str(log)},
                         limit_mm_per_prompt=limits)
    outs = offline.generate(llm, [{"prompt": t, "multi_modal_data": {kind: m}} for kind, m, t in cases])
    del llm
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    records = {m: iter([r for r in rows if r["modality"] == m]) for m in ("image", "video")}  # vLLM groups by modality
    ref = _reference(models[family], config, cases)
    counts = set()
    for i, ((kind, _, _), (n, idx, tok, lp), o) in enumerate(zip(cases, ref, outs)):
        r = next(records[kind])
        assert r["tokens"] == n, f"case {i}: vLLM encoded {r['tokens']} tokens, transformers {n}"
        assert r["kept"] == idx, f"case {i} ({kind}): vLLM kept {r['kept']}, transformers {idx}"
        counts.add(len(idx))
        got = o.outputs[0]
        assert got.token_ids[0] == tok
        assert math.isclose(got.logprobs[0][tok].logprob, lp, abs_tol=1e-4), (i, got.logprobs[0][tok].logprob, lp)
    assert len(counts) > 1  # the newline counts (and, under a ratio, the kept counts) differ with the size


def test_the_default_newline_rule_is_refused_at_start(checkpoints):
    with pytest.raises(Exception, match="newlines"):
        offline.engine(str(checkpoints["llava_next"]), {"method": "kcenter", "keep": 6})
