"""What the families added by adapters alone need beyond the matrix: Qwen3.5's hybrid decoder (linear-attention
layers before and behind an in-LLM step, scoring only from attention layers) and Gemma-3's mask dict (image
blocks, sliding windows)."""

from __future__ import annotations

import pytest
import torch

import vtprune
from cases import rows_for
from vtprune.testing.reference import masked_forward
from vtprune.testing.tiny import build, make_inputs

ATOL, RTOL = 2e-5, 1e-4
L_, F_ = "linear_attention", "full_attention"


def _qwen35(types: list[str], attn: str = "sdpa") -> torch.nn.Module:
    from vtprune.adapters.qwen3_5 import Qwen3_5Adapter

    cfg, cls = Qwen3_5Adapter.tiny_config(len(types))
    cfg.text_config.layer_types = list(types)
    cfg.text_config.num_hidden_layers = len(types)
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():  # a zero padding embedding would hide padding leaking into a recurrent state
        model.get_input_embeddings().weight[0].normal_()
    return model


def _generate_equals_reference(model, method, **kwargs) -> None:
    """Cached generate() against the uncached masked reference (recurrent layers run on the present tokens)."""
    inputs = make_inputs(model, rows_for(model), padding="left")
    L = inputs["input_ids"].shape[1]
    with vtprune.prune(model, method, **kwargs) as handle:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        stats = handle.stats
    assert stats.pruned
    for step, logits in enumerate(out.logits):
        ids = out.sequences[:, : L + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(ids), step, dtype=torch.long)], 1)
        types = (ids == model.config.image_token_id).int() + 2 * (ids == model.config.video_token_id).int()
        ref = masked_forward(model, {**inputs, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types},
                             stats)[:, -1]
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------ Qwen3.5
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("types,method,kwargs", [
    # the real layout (linear layers first): HF sizes the full layers' decode mask from layer 2, itself behind
    # the step, so the decode masks of layers >= K are rebuilt over their own caches
    ([L_, L_, F_, L_], "random", {"ratio": 0.5, "layer": 1}),
    ([L_, L_, F_, L_], "kcenter", {"ratio": 0.5, "layer": 2}),
    ([L_, F_, L_, F_], "fastv", {"ratio": 0.5, "layer": 2}),  # scores from full layer 1; linear layer 2 behind
    ([L_, F_, L_, F_], "kcenter", {"ratio": 0.6}),  # before the LLM: every layer sees the kept tokens only
], ids=["random@1-llfl", "kcenter@2-llfl", "fastv@2-lflf", "kcenter-lflf"])
def test_qwen35_hybrid_decoder_keeps_its_linear_state_consistent(types, method, kwargs, attn):
    _generate_equals_reference(_qwen35(types, attn), method, **kwargs)


def test_qwen35_scores_only_from_attention_layers():
    model = _qwen35([L_, F_, L_, F_])
    with pytest.raises(ValueError, match=r"layer=1 scores from decoder layer 0.*linear_attention.*layer: \[2\]"):
        vtprune.prune(model, "fastv", ratio=0.5, layer=1)
    model = _qwen35([F_, F_, L_, F_])  # TransPrune's IGA reads layer K's own attention
    with pytest.raises(ValueError, match="layer 2 itself, which is a linear_attention layer"):
        with vtprune.prune(model, vtprune.method("transition", layer=(1, 2), fractions=(0.75, 0.5)), ratio=0.5):
            model(**make_inputs(model, rows_for(model)))


def test_qwen35_runs_every_stage_in_one_line():
    model = build("qwen3_5")
    inputs = make_inputs(model, rows_for(model))
    for method, kwargs in [("cls_attention", {"keep": 5}), ("fastv", {"ratio": 0.5, "layer": 1}),
                           ("dart", {"keep": 6, "layer": 2})]:
        with vtprune.prune(model, method, **kwargs) as handle, torch.no_grad():
            model(**inputs)
        assert handle.stats.pruned
