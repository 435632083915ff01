"""Adapter plumbing checked against independent computations: where each LLM token's vision-tower signal
comes from (projector round trip, eager attention maps, pixel-shuffle blocks), DeepStack, and accelerate."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from cases import ADAPTER_CASES, rows_for, visual_of
from vtprune.methods.base import Method
from vtprune.testing.tiny import IMAGE, build, make_inputs


@functools.cache
def _model(family: str, attn: str = "sdpa") -> torch.nn.Module:
    return build(family, attn)


@dataclass(frozen=True, kw_only=True)
class Probe(Method):
    """Keeps the first k candidates and records the signals it reads."""

    name: ClassVar[str] = "adapter_probe"
    requires: ClassVar[frozenset[str]] = frozenset({"tokens", "vit_features", "projector"})
    seen: ClassVar[list] = []
    extra: tuple = ()

    def required_signals(self, has_cls: bool) -> frozenset[str]:
        return self.requires | set(self.extra)

    def select(self, sig, k):
        got = {"rows": sig.rows, "positions": sig.positions, "tokens": sig.tokens,
               "vit_features": sig.vit_features, "projector": sig.projector}
        if "received_attention" in self.extra:
            got["received"] = sig.received_attention()
        if "cls_attention" in self.extra:
            got["cls"] = sig.cls_attention()
        Probe.seen.append(got)
        return torch.arange(k).expand(sig.num_spans, k)


def _probe(model, inputs, **kw):
    Probe.seen.clear()
    with vtprune.prune(model, Probe(**kw), keep=1):  # signals are read on the unpruned sequence
        with torch.no_grad():
            model(**inputs)
    assert Probe.seen, "the probe was never called"
    return list(Probe.seen)


@pytest.mark.parametrize("family", ADAPTER_CASES)
def test_projector_of_vit_features_gives_the_llm_tokens(family):
    """vit_features of each token, pushed through the projector callable, reproduce its LLM input embedding
    wherever the token is not an interpolation of several patches (checks every src / unit / window map)."""
    model = _model(family)
    inputs = make_inputs(model, rows_for(model))
    for got in _probe(model, inputs):
        projected = got["projector"](got["vit_features"])  # (S, N, D)
        tokens = got["tokens"]
        if family == "llava_onevision":  # canvas tokens interpolate patches and videos pool them: base tile only
            side = model.config.vision_config.image_size // model.config.vision_config.patch_size
            projected, tokens = projected[:, : side * side], tokens[:, : side * side]
            if got["positions"].shape[1] < side * side + 2:
                continue
        if family == "llava_next_video" and "pixel_values_videos" in inputs:
            pass  # video tokens: the projector runs after pooling, vit_features are its input: exact too
        torch.testing.assert_close(projected, tokens, atol=1e-5, rtol=1e-4)


def test_internvl_cls_attention_is_the_mass_of_each_tokens_2x2_patches():
    model = _model("internvl", "eager")
    inputs = make_inputs(model, rows_for(model))
    seen = _probe(model, inputs, extra=("cls_attention",))
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
    cls = att[:, :, 0, 1:].mean(1)  # (tiles, 64): eager [CLS] row, head mean
    s = int(cls.shape[1] ** 0.5)
    # which patches does pixel_shuffle put into each token? push the patch coordinates through it
    coords = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij"), -1).float()[None]
    blocks = model.model.pixel_shuffle(coords, scale_factor=0.5).reshape(-1, 4, 2).long()  # (tokens, 4, (r, c))
    for tok in blocks:  # each token is one spatial 2x2 block
        assert tok[:, 0].max() - tok[:, 0].min() == 1 and tok[:, 1].max() - tok[:, 1].min() == 1
    grid = cls.reshape(-1, s, s)
    expected = torch.stack([grid[:, b[:, 0], b[:, 1]].sum(-1) for b in blocks], 1).reshape(-1)  # tiles * tokens
    vis = visual_of(model, inputs["input_ids"])
    seq = torch.full(vis.shape, float("nan"))
    seq[vis] = expected
    got = seen[0]
    torch.testing.assert_close(got["cls"], seq[got["rows"][:, None], got["positions"]], atol=1e-6, rtol=1e-5)


def test_onevision_received_attention_follows_the_anyres_packing():
    model = _model("llava_onevision", "eager")
    inputs = make_inputs(model, rows_for(model)[:1])  # one image whose canvas is down-sampled
    seen = _probe(model, inputs, extra=("received_attention",))
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    n = image_size_to_num_patches(inputs["image_sizes"][0], model.config.image_grid_pinpoints, 56)
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"][0, :n], output_attentions=True).attentions[-1]
    received = att.mean(dim=(1, 2))  # (tiles, P): eager, mean over heads and queries
    packed, _ = model.model.pack_image_features([received[..., None]], inputs["image_sizes"],
                                                image_newline=torch.zeros(1))
    expected = packed[0][:, 0]
    is_nl = torch.zeros_like(expected, dtype=torch.bool)
    got = seen[0]
    vis = visual_of(model, inputs["input_ids"])
    seq = torch.full(vis.shape, float("nan"))
    seq[vis] = expected
    ref = seq[got["rows"][:, None], got["positions"]]
    assert not is_nl.all()
    torch.testing.assert_close(got["received"], ref, atol=1e-6, rtol=1e-5)
    side = 4
    assert expected.numel() > side * side + 9 * side * side // 4, "the canvas should be large enough to be resized"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_qwen_received_attention_is_a_distribution_per_image(family):
    """Each image's tokens share its patches' received attention: the scores of an image sum to 1
    (every query's softmax sums to 1 over the keys of its image)."""
    model = _model(family)
    inputs = make_inputs(model, rows_for(model)[:1])
    got = _probe(model, inputs, extra=("received_attention",))[0]
    torch.testing.assert_close(got["received"].sum(-1), torch.ones(got["received"].shape[0]), atol=1e-5, rtol=0)


def test_qwen_received_attention_is_the_same_in_blocks_of_query_rows(monkeypatch):
    """The column sums are accumulated over blocks of query rows (bounded memory); one row at a time gives
    the single-block (whole matrix) result."""
    import vtprune.adapters.qwen2_vl as Q

    model = _model("qwen2_vl")
    inputs = make_inputs(model, rows_for(model))
    monkeypatch.setattr(Q, "_BLOCK_ELEMENTS", 1 << 40)
    whole = _probe(model, inputs, extra=("received_attention",))
    monkeypatch.setattr(Q, "_BLOCK_ELEMENTS", 1)  # one query row per block
    blocks = _probe(model, inputs, extra=("received_attention",))
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(b["received"], a["received"], atol=1e-6, rtol=1e-5)


def test_qwen3_deepstack_is_cut_with_the_tokens():
    """Pruning below the last DeepStack layer: the injection after pruned layers reaches the kept visual
    tokens only, and the result equals the masked full-sequence reference (see test_invariants)."""
    model = _model("qwen3_vl")
    assert len(model.config.vision_config.deepstack_visual_indexes) == 2  # injected after LLM layers 0 and 1
    inputs = make_inputs(model, rows_for(model))
    from vtprune.testing.reference import masked_forward, pruned_rows

    with vtprune.prune(model, "kcenter", ratio=0.5, layer=1) as h:
        with torch.no_grad():
            out = model(**inputs).logits
        stats = h.stats
    ref = masked_forward(model, inputs, stats)
    for b, rows in enumerate(pruned_rows(out, stats)):
        kept = stats.kept_positions[b]
        real = inputs["attention_mask"][b, kept].bool()
        torch.testing.assert_close(rows[real], ref[b, kept][real], atol=2e-5, rtol=1e-4)


def test_accelerate_dispatch_hooks_coexist():
    """A model dispatched with accelerate (its hooks move weights and activations per module, as with a
    device_map split) gives the same pruned logits as the plain model; our tensors follow each module."""
    from accelerate import cpu_offload

    inputs = make_inputs(_model("llava"), rows_for(_model("llava")))
    plain = build("llava")
    with vtprune.prune(plain, ["cls_attention", vtprune.method("fastv", layer=2, keep=4)], keep=8):
        with torch.no_grad():
            expected = plain(**inputs).logits
    dispatched = build("llava")
    cpu_offload(dispatched, execution_device=torch.device("cpu"))  # weights on "meta", streamed per module
    with vtprune.prune(dispatched, ["cls_attention", vtprune.method("fastv", layer=2, keep=4)], keep=8) as h:
        with torch.no_grad():
            out = dispatched(**inputs).logits
        assert h.stats.visual_after == [4, 4]
    torch.testing.assert_close(out, expected)
    assert any(hasattr(m, "_hf_hook") for m in dispatched.modules())  # accelerate's hooks are still there
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # weights really were offloaded


def test_models_table_lists_every_family():
    families = {m["family"] for m in vtprune.list_models()}
    assert set(ADAPTER_CASES) <= families
    assert IMAGE == 500
