"""Tensor parallelism: with ``tensor_parallel_size=2`` (one CPU core per worker) the plugin picks the same tokens
and gives the same answers as with one worker. visionzip reads the most: [CLS] attention and keys from a ViT
layer (q / k weights sharded across the workers, gathered once), the [CLS] state and the projector's parts."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv (scripts/setup_vllm.sh)")

from vtprune.bench.accuracy import DEFAULT_MODEL, load  # noqa: E402
from vtprune.integrations.vllm import offline  # noqa: E402
from vtprune.synthetic.scenes import heldout  # noqa: E402


@pytest.mark.parametrize("method", ["visionzip"])
def test_tp2_same_tokens_and_answers_as_tp1(method, tmp_path):
    _, processor = load(DEFAULT_MODEL)
    reqs = offline.synthetic_requests(heldout(24), processor.tokenizer)
    runs = {}
    for tp in (1, 2):
        log = tmp_path / f"kept{tp}.jsonl"
        llm = offline.engine(DEFAULT_MODEL, {"method": method, "keep": 64, "record": str(log)},
                             tensor_parallel_size=tp)
        outs = offline.generate(llm, reqs)
        runs[tp] = ([o.outputs[0].token_ids[0] for o in outs], [o.outputs[0].logprobs[0] for o in outs],
                    sorted((round(c, 3), tuple(k)) for c, k in offline.read_kept(log)))
        del llm
    assert runs[2][2] == runs[1][2], "TP=2 kept other tokens than TP=1"
    assert runs[2][0] == runs[1][0], "TP=2 answered differently from TP=1"
    for a, b, tok in zip(runs[1][1], runs[2][1], runs[1][0]):
        assert abs(a[tok].logprob - b[tok].logprob) < 1e-4


def test_tp2_qwen_vision_tower_signals_equal_transformers(tmp_path):
    """Qwen2.5-VL with TP=2: each worker holds half of every ViT attention's heads (the rotated q / k are gathered
    at the attention kernel's input) and half of the merger's linears (gathered once); the kept tokens must still be
    transformers' (visionzip at a window-attention block: received attention, keys, merger input and merger)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vtprune
    from vtprune.testing.checkpoints import save_qwen

    ckpt = save_qwen("qwen2_5_vl", tmp_path / "ckpt")
    config = {"method": "visionzip", "keep": 6, "vit_layer": 1}
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in ((56, 112), (168, 56), (112, 224), (84, 84))]
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>w9<|im_end|>\n<|im_start|>assistant\n"
    model, processor = AutoModelForImageTextToText.from_pretrained(ckpt).eval(), AutoProcessor.from_pretrained(ckpt)
    want = []
    with vtprune.prune(model, vtprune.method("visionzip", vit_layer=1), keep=6) as handle, torch.inference_mode():
        for im in images:
            inputs = processor(images=[im], text=[prompt], return_tensors="pt")
            model(**inputs)
            pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
            want.append(torch.isin(pos, handle.stats.kept_positions[0]).nonzero()[:, 0].tolist())
    log = tmp_path / "kept.jsonl"
    llm = offline.engine(str(ckpt), {**config, "record": str(log)}, tensor_parallel_size=2,
                         limit_mm_per_prompt={"image": 1, "video": 0})
    offline.generate(llm, [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images])
    del llm
    assert [k for _, k in offline.read_kept(log)] == want
