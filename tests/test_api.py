"""prune() contract: bad input fails at prune() time naming the bad value; runtime refusals; stats; config."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers as T

import vtprune
from cases import ROWS
from vtprune import compat
from vtprune.testing.tiny import IMAGE, build, make_inputs


@functools.cache
def _model(family: str = "llava") -> torch.nn.Module:
    return build(family)


@pytest.fixture
def model():
    m = _model()
    yield m
    h = m.__dict__.get("_vtprune_handle")
    if h is not None:
        h.remove()


# ---------------------------------------------------------------- bad input at prune() time
def test_unknown_method_suggests(model):
    with pytest.raises(ValueError, match=r"Unknown method 'kcentre'.*Did you mean 'kcenter'"):
        vtprune.prune(model, "kcentre", ratio=0.5)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_ratio_out_of_range(model, ratio):
    with pytest.raises(ValueError, match="ratio"):
        vtprune.prune(model, "random", ratio=ratio)
    with pytest.raises(ValueError, match=repr(ratio).replace("(", r"\(").replace(")", r"\)")):
        vtprune.prune(model, "random", ratio=ratio)


def test_both_ratio_and_keep(model):
    with pytest.raises(ValueError, match=r"not both.*ratio=0.5.*keep=64"):
        vtprune.prune(model, "random", ratio=0.5, keep=64)


def test_neither_ratio_nor_keep(model):
    with pytest.raises(ValueError, match="'random' has no budget"):
        vtprune.prune(model, "random")


@pytest.mark.parametrize("keep", [0, -3, 2.5, True])
def test_bad_keep(model, keep):
    with pytest.raises(ValueError, match=f"keep must be an integer >= 1.*got {keep!r}"):
        vtprune.prune(model, "random", keep=keep)


def test_stage_the_adapter_cannot_serve(model, monkeypatch):
    from vtprune.adapters.llava import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "stages", frozenset({"input"}))
    with pytest.raises(ValueError, match="cannot prune at the layer stage needed by 'fastv'"):
        vtprune.prune(model, "fastv", ratio=0.5)


def test_unsupported_model_lists_supported():
    lm = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"unsupported model LlamaForCausalLM.*LlavaForConditionalGeneration"):
        vtprune.prune(lm, "random", ratio=0.5)


@pytest.mark.parametrize("layer", [3, 99])
def test_layer_out_of_range(model, layer):
    with pytest.raises(ValueError, match=rf"layer={layer} is out of range.*3 decoder layers.*valid: 1..2"):
        vtprune.prune(model, "fastv", ratio=0.5, layer=layer)


def test_layer_zero_for_previous_layer_method(model):
    with pytest.raises(ValueError, match="layer=0 is invalid"):
        vtprune.prune(model, "fastv", ratio=0.5, layer=0)


def test_pruning_twice(model):
    h = vtprune.prune(model, "random", ratio=0.5)
    with pytest.raises(RuntimeError, match="already pruned"):
        vtprune.prune(model, "kcenter", ratio=0.5)
    h2 = vtprune.prune(model, "kcenter", ratio=0.5, replace=True)
    assert not h.active and h2.active
    h2.remove()


def test_bad_policy_and_positions(model):
    with pytest.raises(ValueError, match=r"budget='per_crop'.*allowed: 'per_frame', 'per_image', 'global'"):
        vtprune.prune(model, "random", ratio=0.5, budget="per_crop")
    with pytest.raises(ValueError, match=r"positions='relative'.*'original', 'compact'"):
        vtprune.prune(model, "random", ratio=0.5, positions="relative")


def test_unknown_method_argument(model):
    with pytest.raises(ValueError, match=r"unknown argument\(s\) 'sead'.*allowed: ratio, keep, layer, seed"):
        vtprune.prune(model, "random", ratio=0.5, sead=3)
    with pytest.raises(ValueError, match=r"merge='max'.*allowed: 'mean', 'none'"):
        vtprune.method("pool", merge="max")


def test_method_options_with_a_list_must_be_objects(model):
    with pytest.raises(ValueError, match="vtprune.method"):
        vtprune.prune(model, ["random", "kcenter"], ratio=0.5, layer=1)


def test_cls_method_on_a_tower_without_cls():
    cfg = T.LlavaConfig(
        vision_config=T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=56, patch_size=14),
        text_config=_model().config.text_config, image_token_index=IMAGE, vision_feature_select_strategy="full",
        vision_feature_layer=-1)
    m = T.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match=r"'cls_attention' needs a \[CLS\] token.*siglip_vision_model"):
        vtprune.prune(m, "cls_attention", ratio=0.5, no_cls="error")
    ids = torch.tensor([[1, 5] + [IMAGE] * 16 + [6, 7]])
    pv = torch.randn(1, 3, 56, 56)
    with torch.no_grad(), vtprune.prune(m, "cls_attention", keep=4) as h:  # default: mean received attention
        m(input_ids=ids, pixel_values=pv)
    with torch.no_grad():
        att = m.model.vision_tower(pv, output_attentions=True).attentions[-1]  # (1, H, 16, 16), eager
    expected = 2 + att.mean(dim=(1, 2))[0].topk(4).indices.sort().values
    kept = h.stats.kept_positions[0]
    assert torch.equal(kept[(kept >= 2) & (kept < 18)], expected)


def test_flex_attention_is_refused(model, monkeypatch):
    from vtprune.adapters.llava import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "attn_implementation", lambda self: "flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported"):
        vtprune.prune(model, "random", ratio=0.5)


# ---------------------------------------------------------------- runtime behaviour
def test_prompt_without_image_passes_through(model):
    ids = torch.tensor([[1, 10, 11, 12]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with vtprune.prune(model, "kcenter", ratio=0.9) as h:
            out = model(input_ids=ids).logits
            gen = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
            assert h.stats.visual_before == []
        ref = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, base) and torch.equal(gen, ref)


def test_placeholder_feature_mismatch_names_both_counts(model):
    inputs = make_inputs(model, ROWS[:1])
    ids = inputs["input_ids"].clone()
    ids[0, -1] = IMAGE  # one placeholder too many
    with vtprune.prune(model, "random", ratio=0.5), pytest.raises(ValueError, match=r"tokens: 17|17 placeholder"):
        model(**{**inputs, "input_ids": ids})


def test_non_finite_scores_raise(model, monkeypatch):
    from vtprune.methods.random import RandomPrune

    monkeypatch.setattr(RandomPrune, "score", lambda self, sig: torch.full(sig.positions.shape, float("nan")))
    inputs = make_inputs(model, ROWS[:1])
    with vtprune.prune(model, "random", ratio=0.5), pytest.raises(FloatingPointError, match="non-finite"):
        model(**inputs)


def test_bad_method_output_is_caught(model, monkeypatch):
    from vtprune.methods.random import RandomPrune

    monkeypatch.setattr(RandomPrune, "select", lambda self, sig, k: torch.zeros(sig.num_spans, k, dtype=torch.long))
    inputs = make_inputs(model, ROWS[:1])
    with vtprune.prune(model, "random", ratio=0.5), pytest.raises(RuntimeError, match="duplicate"):
        model(**inputs)


def test_static_cache_is_refused(model):
    inputs = make_inputs(model, ROWS[:1])
    with vtprune.prune(model, "random", ratio=0.5), pytest.raises(NotImplementedError, match="static"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_images_after_a_pruned_prefill_are_refused(model):
    """A cache holding a pruned prompt cannot take more visual tokens (a later turn with an image, or the next
    chunk of a chunked prefill): a clear error instead of positions and masks that no longer line up."""
    first, second = make_inputs(model, ROWS[:1]), make_inputs(model, ROWS[1:])
    with vtprune.prune(model, "random", ratio=0.5), torch.no_grad():
        cache = compat.cache_out(model(**first, use_cache=True))
        turn = {"input_ids": second["input_ids"], "pixel_values": second["pixel_values"]}
        with pytest.raises(NotImplementedError, match="visual tokens to a KV cache that already holds a pruned"):
            model(**turn, **compat.with_cache(cache), use_cache=True)


def test_chunked_prefill_is_refused(model):
    inputs = make_inputs(model, ROWS[:1])
    with vtprune.prune(model, "random", ratio=0.5), pytest.raises(NotImplementedError, match="prefill_chunk_size=8"):
        model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=8)


def test_stats_report_per_stage_and_per_layer(model):
    inputs = make_inputs(model, ROWS)
    with vtprune.prune(model, ["cls_attention", vtprune.method("fastv", layer=2, keep=3)], keep=8) as h:
        with torch.no_grad():
            model(**inputs)
    s = h.stats
    assert s.visual_before == [16, 16] and s.visual_after == [3, 3]
    assert s.overhead_ms >= s.select_ms > 0  # the hooks' whole time: selection, signals, layouts, cutting
    assert [st.stage for st in s.stages] == ["vision", "layer:2"]
    assert [st.after for st in s.stages] == [[8, 8], [3, 3]]
    assert s.mean_visual_per_layer == pytest.approx([(8 + 8 + 3) / 3] * 2)
    assert all(st.select_ms >= 0 for st in s.stages) and "16, 16" in s.summary()


def test_handle_config_round_trips_through_json(model):
    with vtprune.prune(model, ["cls_attention", vtprune.method("fastv", layer=2, keep=3)], ratio=0.5) as h:
        cfg = json.loads(json.dumps(h.to_dict()))
    assert [s["method"]["method"] for s in cfg["steps"]] == ["cls_attention", "fastv"]
    assert [s["stage"] for s in cfg["steps"]] == ["vision", "layer:2"]
    assert cfg["steps"][0]["budget"] == {"ratio": 0.5, "keep": None, "policy": "per_frame"}
    m = vtprune.Method.from_dict(cfg["steps"][1]["method"])
    assert m == vtprune.method("fastv", layer=2, keep=3)


def test_method_dict_has_version_and_rejects_newer():
    d = vtprune.method("kcenter", ratio=0.5).to_dict()
    assert d == {"method": "kcenter", "version": 1, "ratio": 0.5, "keep": None, "layer": None, "variant": "divprune",
                 "pivot": "auto", "vit_layer": None, "seed": 0, "drop_layer": None, "tau": 0.1}
    assert vtprune.Method.from_dict(d) == vtprune.method("kcenter", ratio=0.5)
    with pytest.raises(ValueError, match="newer vtprune"):
        vtprune.Method.from_dict({**d, "version": 99})


def test_import_patches_nothing():
    import subprocess
    import sys

    code = ("import sys, vtprune; assert 'torch' not in sys.modules; "
            "assert 'vtprune.api' not in sys.modules; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_list_methods_and_models():
    assert {"random", "pool", "fastv", "cls_attention", "kcenter"} <= set(vtprune.list_methods())
    families = {m["family"]: m for m in vtprune.list_models()}
    assert "LlavaNextForConditionalGeneration" in families["llava_next"]["classes"]
    assert vtprune.method("divprune") == vtprune.method("kcenter")  # paper names are aliases
