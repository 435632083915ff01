"""Gemma-4 beyond the matrix: Per-Layer Embeddings cut with the sequence (at the LLM input and behind an in-LLM
step), KV sharing (allowed up to the first store layer, refused beyond), image blocks bidirectional in sliding
layers only, the sliding window in kept tokens, ViT signals pooled by the patch positions, a grid per image from its
own patch positions, and video only where transformers' forward encodes it (>= 5.25)."""

from __future__ import annotations

import pytest
import torch

import vtprune
import vtprune.adapters.gemma4 as g4
from cases import rows_for
from vtprune.budget import Budget
from vtprune.testing.reference import generate_positions, masked_forward, pruned_rows
from vtprune.testing.tiny import IMAGE, VIDEO, Row, build, make_inputs

ATOL, RTOL = 2e-5, 1e-4
NOT_TEXT = [IMAGE, VIDEO]  # never generated (output_logits are the raw logits: the comparisons are unaffected)


def _gap(model, inputs, method, **kwargs) -> float:
    """Largest |pruned - masked reference| over the real kept rows of a forward pruned by ``method``."""
    with vtprune.prune(model, method, **kwargs) as handle, torch.no_grad():
        out = model(**inputs).logits
        stats = handle.stats
    assert stats.pruned
    ref = masked_forward(model, inputs, stats)
    gaps = []
    for b, rows in enumerate(pruned_rows(out, stats)):
        kept = stats.kept_positions[b]
        real = inputs["attention_mask"][b, kept].bool()
        gaps.append(float((rows[real] - ref[b, kept][real]).abs().max()))
    return max(gaps)


def _generate_matches_reference(model, method, **kwargs) -> None:
    """Cached generate() under pruning == the uncached masked reference, step by step (DESIGN invariant 5)."""
    inputs = make_inputs(model, rows_for(model), padding="left")
    L = inputs["input_ids"].shape[1]
    with vtprune.prune(model, method, **kwargs) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, suppress_tokens=NOT_TEXT)
        stats = handle.stats
    assert stats.pruned
    for step, logits in enumerate(out.logits):
        ids = out.sequences[:, : L + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(ids), step, dtype=torch.long)], 1)
        types = torch.cat([inputs["mm_token_type_ids"], inputs["mm_token_type_ids"].new_zeros(len(ids), step)], 1)
        ref_inputs = {**inputs, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
        ref = masked_forward(model, ref_inputs, stats, position_ids=generate_positions(mask))[:, -1]
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------- Per-Layer Embeddings
def _strong_ple(cfg) -> None:
    cfg.text_config.hidden_size_per_layer_input = 16


@pytest.fixture(scope="module")
def ple_model():
    """A tiny model whose per-layer inputs weigh: the per-layer embedding table and the layers' PLE gates scaled up."""
    model = build("gemma4", edit=_strong_ple)
    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens_per_layer.weight.mul_(30.0)
        for layer in lm.layers:
            layer.per_layer_input_gate.weight.mul_(10.0)
            layer.per_layer_projection.weight.mul_(10.0)
    return model


def test_per_layer_inputs_matter_in_the_planted_model(ple_model):
    """The guard of the tests below: dropping the token-identity per-layer inputs moves the logits a lot."""
    inputs = make_inputs(ple_model, rows_for(ple_model))
    lm = ple_model.model.language_model
    with torch.no_grad():
        base = ple_model(**inputs).logits
        saved = lm.embed_tokens_per_layer.weight.clone()
        lm.embed_tokens_per_layer.weight.zero_()
        try:
            without = ple_model(**inputs).logits
        finally:
            lm.embed_tokens_per_layer.weight.copy_(saved)
    assert float((base - without).abs().max()) > 1.0


@pytest.mark.parametrize("method,kwargs", [("kcenter", {"ratio": 0.6}), ("fastv", {"ratio": 0.5, "layer": 1}),
                                           ("random", {"ratio": 0.5, "layer": 2})],
                         ids=["input", "layer1", "layer2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_per_layer_inputs_are_cut_with_the_sequence(ple_model, method, kwargs, padding, monkeypatch):
    """The pruned forward equals the masked reference (the unpatched model, each token reading its OWN per-layer
    input); the same forward with the per-layer inputs gathered in the wrong order (kept slots reversed) does not:
    the check sees a misaligned cut, at the LLM input and at layer K alike."""
    inputs = make_inputs(ple_model, rows_for(ple_model), padding=padding)
    assert _gap(ple_model, inputs, method, **kwargs) < ATOL * 10
    take = g4._take_ple
    monkeypatch.setattr(g4, "_take_ple", lambda ple, index, valid: take(ple, index.flip(1), valid.flip(1)))
    assert _gap(ple_model, inputs, method, **kwargs) > 1e-2


# ------------------------------------------------------------------------------------------------- KV sharing
def _kv_shared(cfg) -> None:
    cfg.text_config.num_kv_shared_layers = 2  # 6 layers s s f s s f: layers 4, 5 reuse the K/V of 3 (s) and 2 (f)


@pytest.fixture(scope="module")
def shared_model():
    return build("gemma4", text_layers=6, edit=_kv_shared)


def test_kv_sharing_roles_and_refusals(shared_model):
    adapter = vtprune.adapter_for(shared_model)
    assert adapter._kv_roles() == ([2, 3], [4, 5])
    assert adapter.attention_layers() == frozenset(range(4))  # reuse layers have no k_proj
    assert not hasattr(shared_model.model.language_model.layers[4].self_attn, "k_proj")
    for K in (3, 4, 5):
        with pytest.raises(ValueError, match=rf"layer={K} is not supported .*layers \[4, 5\] reuse .*layers \[2, 3\] "
                                             r".*prune at layer <= 2"):
            vtprune.prune(shared_model, "random", ratio=0.5, layer=K)
    assert vtprune.handle_of(shared_model) is None


@pytest.mark.parametrize("method,kwargs", [("kcenter", {"ratio": 0.6}), ("fastv", {"ratio": 0.5, "layer": 2}),
                                           ("random", {"ratio": 0.3, "layer": (1, 2)})],
                         ids=["input", "layer2", "layers1,2"])
def test_kv_sharing_pruned_up_to_the_first_store_layer(shared_model, method, kwargs):
    """Store and reuse layers see the same kept tokens: forward == masked reference, and cached generate() (where
    transformers 5.25 slices the reuse layers' inputs to the last token) == the uncached reference."""
    inputs = make_inputs(shared_model, rows_for(shared_model), padding="left")
    assert _gap(shared_model, inputs, method, **kwargs) < ATOL * 10
    _generate_matches_reference(shared_model, method, **kwargs)


# ------------------------------------------------------------------------------------- masks of the kept tokens
@pytest.mark.parametrize("bidirectional", ["vision", None])
def test_image_blocks_bidirectional_as_the_config_says(bidirectional):
    """With ``use_bidirectional_attention="vision"`` the kept image tokens of one image still see each other both
    ways (the rebuilt masks carry the kept token types): the first kept image token's output moves when only LATER
    kept image tokens change. Without it (the config default) the masks stay causal and it does not move."""

    def edit(cfg):
        cfg.text_config.use_bidirectional_attention = bidirectional

    model = build("gemma4", edit=edit)
    inputs = make_inputs(model, rows_for(model)[:1])
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE).nonzero()[0])
    with vtprune.prune(model, "random", ratio=0.5) as handle, torch.no_grad():
        base = model(**inputs).logits[0]
        kept = handle.stats.kept_positions[0]
        image = kept[ids[kept] == IMAGE]  # original positions of the kept image tokens

        def later_only(module, args, output):  # change the features of the image tokens after the first kept one
            output = output.clone()
            output[image[1:] - start] += 3.0
            return output

        hook = model.model.embed_vision.register_forward_hook(later_only)
        try:
            after = model(**inputs).logits[0]
        finally:
            hook.remove()
    first = int((kept == image[0]).nonzero())  # its row in the pruned sequence (batch 1: no padding slots)
    assert torch.equal(base[:first], after[:first])  # text before the image cannot see it
    assert torch.equal(base[first], after[first]) == (bidirectional is None)


def _windowed(window: int, attn: str):
    def edit(cfg):
        cfg.text_config.sliding_window = window

    return build("gemma4", attn, text_layers=4, edit=edit)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,kwargs", [("kcenter", {"ratio": 0.5}), ("random", {"ratio": 0.5, "layer": 1}),
                                           ("kcenter", {"ratio": 0.6, "layer": 2})],
                         ids=["kcenter", "random@1", "kcenter@2"])
def test_sliding_window_counts_kept_tokens(method, kwargs, attn):
    """A window narrower than the prompt (6 tokens): the sliding cache holds the last W - 1 KEPT tokens, so the masks
    are rebuilt in kept-token coordinates; cached decoding equals re-running the pruned sequence at every step."""
    model = _windowed(6, attn)
    inputs = make_inputs(model, rows_for(model), padding="left")
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
              suppress_tokens=NOT_TEXT)  # a generated placeholder would be a visual token when re-run uncached
    with vtprune.prune(model, method, **kwargs) as handle:
        cached = model.generate(**inputs, use_cache=True, **kw)
        assert handle.stats.pruned
        uncached = model.generate(**inputs, use_cache=False, **kw)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------- layout and ViT signals
def test_each_image_gets_the_grid_of_its_own_patches():
    """Images of different sizes in one batch: every image's tokens form the (Hp / k) x (Wp / k) raster grid of its
    own patch positions (read independently here from ``image_position_ids``)."""
    model = build("gemma4")
    rows = [Row(before=2, after=2, seed=0, image_size=(40, 50)), Row(before=2, after=2, seed=1, image_size=(56, 28)),
            Row(before=1, after=1, seed=2, images=2, image_size=(30, 30))]
    inputs = make_inputs(model, rows)
    with vtprune.prune(model, "kcenter", ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
        layout = handle.stats.layout
    k = model.config.vision_config.pooling_kernel_size
    for i, pos in enumerate(inputs["image_position_ids"]):
        real = pos[(pos != -1).all(-1)]
        gh, gw = (int(real[:, 1].max()) + 1) // k, (int(real[:, 0].max()) + 1) // k
        cells = layout.grid[layout.image == i]  # (n, 3) (group, row, col) in sequence order
        expected = torch.stack([torch.zeros(gh * gw, dtype=torch.long), torch.arange(gh * gw) // gw,
                                torch.arange(gh * gw) % gw], 1)
        assert torch.equal(cells, expected), i
    assert [int((layout.image == i).sum()) for i in range(4)] == [20, 10, 9, 9]


def test_received_attention_pools_the_eager_attention_maps():
    """``received_attention`` of a token = the attention its k x k patches receive in the eager vision tower (mean over
    heads and the image's real queries), summed over the patches the pooler averages into it."""
    from test_adapters import _probe

    model = build("gemma4", "eager")
    inputs = make_inputs(model, rows_for(model))
    got = _probe(model, inputs, extra=("received_attention",))[0]
    with torch.no_grad():
        att = model.model.vision_tower(pixel_values=inputs["pixel_values"],
                                       pixel_position_ids=inputs["image_position_ids"],
                                       output_attentions=True).attentions[-1]  # (n, H, T, T)
    k = model.config.vision_config.pooling_kernel_size
    expected = []
    for a, pos in zip(att, inputs["image_position_ids"]):
        real = (pos != -1).all(-1)
        received = a[:, real][:, :, real].mean(dim=(0, 1))  # (n_real,): mean over heads and real queries
        xy = pos[real]
        gw = (int(xy[:, 0].max()) + 1) // k
        token = (xy[:, 1] // k) * gw + xy[:, 0] // k  # the pooler's block of each patch
        expected.append(torch.zeros(int(token.max()) + 1).index_add_(0, token, received))
    vis = inputs["input_ids"] == IMAGE
    seq = torch.full(vis.shape, float("nan"))
    seq[vis] = torch.cat(expected)
    torch.testing.assert_close(got["received"], seq[got["rows"][:, None], got["positions"]], atol=1e-6, rtol=1e-5)


def test_positions_that_do_not_tile_blocks_are_refused():
    pos = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1], [-1, -1], [-1, -1]])  # 3 x 2 patches, k = 2
    with pytest.raises(ValueError, match="do not tile a grid of 2 x 2 blocks"):
        g4._pool_members(pos, 2)


# ------------------------------------------------------------------------------------------------------- video
def test_video_only_where_transformers_encodes_it():
    """transformers 5.19's Gemma4Model.forward does not pass num_frames_per_video to get_video_features (every video
    forward raises): the family takes no video there, with the reason; from 5.25 a video's frames are spans."""
    model = build("gemma4")
    adapter = vtprune.adapter_for(model)
    if not g4.video_forward_supported():
        assert g4.Gemma4Adapter.video is None
        with pytest.raises(NotImplementedError, match="transformers >= 5.25.*num_frames_per_video"):
            adapter.tiny_video(2, (40, 50), seed=0)
        return
    inputs = make_inputs(model, [Row(before=2, after=3, seed=0, image_size=(40, 50), images=0, video_frames=3)])
    with vtprune.prune(model, "random", ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats
    spans = stats.stages[0].spans
    assert [(s.n, s.kept) for s in spans] == [(20, 10)] * 3  # a span per frame (per_frame budget)
    layout = stats.layout
    assert layout.frame[layout.visual].unique().tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method,kwargs", [("random", {"ratio": 0.5}), ("kcenter", {"ratio": 0.5}),
                                           ("fastv", {"ratio": 0.5, "layer": 1})], ids=["random", "kcenter", "fastv@1"])
def test_training_through_pruning_matches_the_masked_reference(ple_model, method, kwargs):
    """loss.backward() through a pruned forward (the per-layer inputs weighing): the loss equals the masked
    reference's and so does every gradient, up to float32 rounding. The gradients carry a relative 5e-6 here (the
    vision pooler runs in float32 and Gemma-4's attention is unscaled over normed q / k), above the 1e-6 of
    tests/test_hf_host.py's shared check, so that one leaves gemma4 out; a misaligned cut is off by far more."""
    import torch.nn.functional as F

    from test_hf_host import _labels

    model = ple_model
    inputs = make_inputs(model, [r for r in rows_for(model) if not r.video_frames], padding="left")
    labels = _labels(inputs, inputs["input_ids"] == IMAGE, "all")
    try:
        with vtprune.prune(model, method, **kwargs) as handle:
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            stats = handle.stats
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        logits = masked_forward(model, inputs, stats, differentiable=True)  # (B, L, V)
        target = F.pad(labels, (0, 1), value=-100)[:, 1:].clone()  # the next-token target of every position
        for b, kept in enumerate(stats.positions_at(max(stats.positions_by_layer))):
            dropped = torch.ones(labels.shape[1], dtype=torch.bool)
            dropped[kept] = False
            target[b, dropped] = -100  # a dropped token has no logits row
        ref = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        ref.backward()
        ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
        assert set(grads) == set(ref_grads) and "model.language_model.embed_tokens_per_layer.weight" in grads
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, atol=2e-5 * max(1.0, float(g.abs().max())), rtol=1e-3, msg=n)
    finally:
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------- lmms-eval
def test_lmms_eval_wrapper_subclasses_lmms_evals_gemma4_and_validates_first():
    """``vtprune_gemma4`` is lmms-eval's own Gemma4 class with pruning; bad pruning args fail before any loading."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.models.simple.gemma4 import Gemma4

    from vtprune.integrations.lmms_eval import PruningMixin, model_class

    cls = model_class("vtprune_gemma4")
    assert cls.__name__ == "VTPruneGemma4" and issubclass(cls, PruningMixin) and issubclass(cls, Gemma4)
    missing = "/nonexistent/model"  # any load attempt would raise OSError, not ValueError
    with pytest.raises(ValueError, match=r"kcentre"):
        cls(pretrained=missing, method="kcentre", ratio=0.5)
    with pytest.raises(ValueError, match=r"'bogus'.*max_soft_tokens"):  # the allowed list is the parent's signature
        cls(pretrained=missing, method="random", keep=4, bogus=1)


needs_video = pytest.mark.skipif(not g4.video_forward_supported(),
                                 reason="transformers 5.19's Gemma4Model.forward cannot encode videos")


@needs_video
def test_video_frames_are_what_the_image_processor_makes():
    """vtprune's frame pipeline (no torchvision) == Gemma-4's PIL image processor on the same picture (the video
    processor shares its resize rule, rescale and patch layout): pixels, positions and tokens per frame."""
    import numpy as np
    from PIL import Image
    from transformers import Gemma4ImageProcessorPil

    from vtprune.video.inputs import FramePreprocessor

    frame = np.random.default_rng(0).integers(0, 256, (120, 161, 3), dtype=np.uint8)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=70)(images=[Image.fromarray(frame)], return_tensors="pt")
    mine = FramePreprocessor.defaults("gemma4")(np.stack([frame, frame]))
    assert mine["pixel_values_videos"].shape == (2, *ref["pixel_values"].shape[1:])
    torch.testing.assert_close(mine["pixel_values_videos"][1:], ref["pixel_values"], atol=2e-3, rtol=0)
    assert torch.equal(mine["video_position_ids"][1:], ref["image_position_ids"])
    assert int(mine["tokens_per_frame"]) == int(ref["num_soft_tokens_per_image"][0])


@needs_video
def test_video_placeholder_is_replace_video_token():
    """The expansion of the video placeholder is Gemma4Processor.replace_video_token's (called on a stand-in)."""
    from types import SimpleNamespace

    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    from vtprune.video import tiny_builder

    model = build("gemma4")
    b = tiny_builder(model, ["What ?"], frames=3)
    pixels = {"tokens_per_frame": torch.tensor(4), "num_frames_per_video": torch.tensor([3])}
    stamps = [0.0, 61.5, 125.0]
    hf = Gemma4Processor.replace_video_token(
        SimpleNamespace(boi_token=b.vision_start, eoi_token=b.vision_end, video_token=b.video_token),
        {"num_soft_tokens_per_video": [4], "video_metadata": [SimpleNamespace(fps=2.0, timestamps=stamps)]}, 0)
    assert b.placeholder(pixels, stamps) == hf
    assert "01:01 " in hf and "02:05 " in hf


@needs_video
@pytest.mark.parametrize("method", ["kcenter", "holitom"])
def test_video_qa_runs_gemma4(tmp_path, method):
    """``vtprune video-qa`` on the tiny model: decoded frames through the family's VideoFormat, pruned per frame (or a
    whole video per span for the video methods), an overlay saved."""
    import json

    pytest.importorskip("av")
    import vtprune.video_qa as qa
    from vtprune import synthetic_video as SV

    data = tmp_path / "data"
    SV.generate(data, n=2, seed=0, frames=16, fps=8.0, width=96, height=64)
    out = tmp_path / "out"
    assert qa.main(["--model", "tiny:gemma4", "--data", str(data / "annotations.json"), "--method", method,
                    "--ratio", "0.75", "--frames", "4", "--out", str(out), "--max-new-tokens", "2", "--limit", "1",
                    "--no-progress", "--save-overlays", "1"]) == 0
    (rec,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    n, per_frame = rec["visual_before"], rec["visual_before"] // 4
    if method == "holitom":  # a whole video per span, then its in-LLM merge
        assert rec["visual_after"] <= vtprune.method(method).video_count(Budget(ratio=0.75), n, 4) < n
    else:
        assert n == 4 * per_frame and rec["visual_after"] == 4 * Budget(ratio=0.75).count(per_frame)
    assert (out / rec["overlay"]).is_file()
