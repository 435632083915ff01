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


def _generate_and_reference(model, method, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decode step, (cached generate()'s logits, the uncached masked reference's logits); recurrent layers
    run on the present tokens in the reference."""
    inputs = make_inputs(model, rows_for(model), padding="left")
    L = inputs["input_ids"].shape[1]
    with vtprune.prune(model, method, **kwargs) as handle:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        stats = handle.stats
    assert stats.pruned
    pairs = []
    for step, logits in enumerate(out.logits):
        ids = out.sequences[:, : L + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(ids), step, dtype=torch.long)], 1)
        types = (ids == model.config.image_token_id).int() + 2 * (ids == model.config.video_token_id).int()
        ref = masked_forward(model, {**inputs, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types},
                             stats)[:, -1]
        pairs.append((logits, ref))
    return pairs


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
    pairs = _generate_and_reference(_qwen35(types, attn), method, **kwargs)
    assert len(pairs) == 4  # every decode step compared
    for got, ref in pairs:
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


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


# ------------------------------------------------------------------------------------------------ Gemma-3
def _gemma3(window: int, attn: str = "sdpa") -> torch.nn.Module:
    from vtprune.adapters.gemma3 import Gemma3Adapter

    cfg, cls = Gemma3Adapter.tiny_config(4)
    cfg.text_config.sliding_window = window
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[0].normal_()
    Gemma3Adapter.tiny_init(model, torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,kwargs", [("kcenter", {"ratio": 0.5}), ("random", {"ratio": 0.5, "layer": 1}),
                                           ("kcenter", {"ratio": 0.6, "layer": 2})],
                         ids=["kcenter", "random@1", "kcenter@2"])
def test_gemma3_sliding_window_counts_kept_tokens(method, kwargs, attn):
    """A window narrower than the prompt (6 < 29 tokens): the sliding cache holds the last W - 1 KEPT tokens, so
    the masks are rebuilt in kept-token coordinates; cached decoding then equals re-running the whole pruned
    sequence at every step (cutting HF's original-coordinate masks drifted by 4e-2 at decode)."""
    model = _gemma3(window=6, attn=attn)
    inputs = make_inputs(model, rows_for(model), padding="left")
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with vtprune.prune(model, method, **kwargs) as handle:
        cached = model.generate(**inputs, use_cache=True, **kw)
        assert handle.stats.pruned
        uncached = model.generate(**inputs, use_cache=False, **kw)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_gemma3_image_blocks_stay_bidirectional():
    """The kept image tokens of one image still see each other both ways (the rebuilt masks carry the cut token
    types): the first kept image token's output moves when only LATER kept image tokens change."""
    model = build("gemma3")
    inputs = make_inputs(model, rows_for(model)[:1])
    ids = inputs["input_ids"][0]
    start = int((ids == model.config.image_token_id).nonzero()[0])
    with vtprune.prune(model, "random", ratio=0.5) as handle, torch.no_grad():
        base = model(**inputs).logits[0]
        kept = handle.stats.kept_positions[0]
        image = kept[ids[kept] == model.config.image_token_id]  # original positions of the kept image tokens

        def later_only(module, args, output):  # change the features of the image tokens after the first kept one
            output = output.clone()
            output[0, image[1:] - start] += 3.0
            return output

        hook = model.model.multi_modal_projector.register_forward_hook(later_only)
        try:
            after = model(**inputs).logits[0]
        finally:
            hook.remove()
    first = int((kept == image[0]).nonzero())  # its row in the pruned sequence (batch 1: no padding slots)
    assert not torch.allclose(base[first], after[first])
    assert torch.equal(base[:first], after[:first]) or first == 0  # text before the image cannot see it
