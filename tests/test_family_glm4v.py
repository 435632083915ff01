"""GLM-4.1V: what is peculiar to the family, each checked against transformers' own code -- the attention's
interleaved partial rotary (``decoder_qk``), videos on the image placeholder (told apart by the processor's
bracket rule), the per-temporal-patch frames and their M-RoPE grid, the 2x2 conv projector, the video processor
re-implemented without torchvision, ``vtprune video-qa`` and the lmms-eval wrapper. The invariant matrix runs twice
(tests/cases.py): on video prompts ("glm4v") and on image prompts ("glm4v-images"), as GLM-4.1V cannot batch images
with videos."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

import test_adapters as ta
import test_invariants as inv
import vtprune
from cases import ROWS, TWO_IMAGES, rows_for
from vtprune.adapters.base import Adapter
from vtprune.budget import Budget
from vtprune.testing.tiny import Row, make_inputs

VIDEO_ROWS = [Row(before=3, after=4, seed=0, image_size=(40, 50), images=0, video_frames=4),
              Row(before=6, after=2, seed=1, image_size=(56, 28), images=0, video_frames=6)]


def _model(attn: str = "sdpa") -> torch.nn.Module:
    return inv._model("glm4v", attn)  # the matrix's cached tiny model


# ------------------------------------------------------------------------------------------ decoder attention
def test_decoder_qk_is_the_attention_modules_own_rotated_q_and_k(monkeypatch):
    """The in-LLM signals' q / k equal what each decoder attention computes (transformers'
    ``apply_rotary_pos_emb`` output), on video prompts whose t / h / w positions differ; the rotate-half layout
    every other family uses does not (the rotary pairs adjacent dimensions on half of each head)."""
    from transformers.models.glm4v import modeling_glm4v as G

    model = _model()
    adapter = vtprune.adapter_for(model)
    rotated, calls = [], []
    original = G.apply_rotary_pos_emb

    def spy(q, k, cos, sin, *args, **kwargs):
        out = original(q, k, cos, sin, *args, **kwargs)
        rotated.append(out)
        return out

    monkeypatch.setattr(G, "apply_rotary_pos_emb", spy)
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: calls.append((m, kw["hidden_states"] if "hidden_states" in kw else a[0],
                                       kw["position_embeddings"])), with_kwargs=True)
        for layer in adapter.decoder_layers]
    try:
        with torch.no_grad():
            model(**make_inputs(model, VIDEO_ROWS))
    finally:
        for h in hooks:
            h.remove()
    assert len(rotated) == len(calls) == adapter.num_layers
    for (attn, x, (cos, sin)), (q, k) in zip(calls, rotated):
        assert cos.shape[-1] == attn.head_dim // 2  # partial rotary: half of each head
        with torch.no_grad():
            torch.testing.assert_close(adapter.decoder_qk(attn, x, cos, sin, key=False), q, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(adapter.decoder_qk(attn, x, cos, sin, key=True), k, atol=1e-6, rtol=1e-5)
            wrong = Adapter.decoder_qk(adapter, attn, x, cos, sin, key=False)  # rotate-half
        assert not torch.allclose(wrong, q, atol=1e-3)


# ------------------------------------------------------------------------------------ placeholders and layout
def test_placeholders_are_split_by_the_video_brackets_as_the_processor_types_them():
    """Images and video frames share ``<|image|>``: the adapter's modality masks (from ids, and from embeddings)
    and the tiny inputs' ``mm_token_type_ids`` are transformers' ``Glm4vProcessor.create_mm_token_type_ids``."""
    from transformers import Glm4vProcessor

    model = _model()
    c = model.config
    adapter = vtprune.adapter_for(model)
    rows = [Row(images=2, seed=0), Row(images=0, video_frames=4, seed=1), Row(images=1, video_frames=6, seed=2)]
    inputs = make_inputs(model, rows)  # typed only (transformers cannot run an image and a video together)
    processor = types.SimpleNamespace(image_token_id=c.image_token_id, video_start_id=c.video_start_token_id,
                                      video_end_id=c.video_end_token_id)
    ref = torch.tensor(Glm4vProcessor.create_mm_token_type_ids(processor, inputs["input_ids"].tolist()))
    assert bool((ref == 1).any()) and bool((ref == 2).any())
    assert torch.equal(inputs["mm_token_type_ids"], ref.int())
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    for masks in (adapter.visual_masks(inputs["input_ids"], None), adapter.visual_masks(None, embeds)):
        assert torch.equal(masks["image"], ref == 1) and torch.equal(masks["video"], ref == 2)


@pytest.mark.parametrize("rows", [[*ROWS, TWO_IMAGES], VIDEO_ROWS], ids=["images", "videos"])
def test_layout_is_the_models_own_3d_grid(rows):
    """Every visual token's (row, col) and frame, as pruning lays them out, are what ``get_rope_index`` gives it:
    row / col = its h / w position minus its block's start, frame = the rank of its temporal position among its
    video's (a frame per temporal patch of 2 frames)."""
    model = _model()
    inputs = make_inputs(model, rows)
    with vtprune.prune(model, "random", ratio=0.5) as h, torch.no_grad():
        model(**inputs)
        lay = h.stats.layout
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                        inputs["attention_mask"])
    vis = lay.visual
    assert torch.equal(vis, inputs["mm_token_type_ids"] > 0)
    t, y, x = pos[:, vis]  # (n,) each, row-major: the order the features are placed in
    assert torch.equal(lay.grid[vis][:, 1], y - t) and torch.equal(lay.grid[vis][:, 2], x - t)
    image, frame = lay.image[vis], lay.frame[vis]
    for i in image.unique().tolist():
        on = image == i
        assert torch.equal(frame[on], torch.unique(t[on], return_inverse=True)[1])
    frames = [r.video_frames // 2 or 1 for r in rows for _ in range(max(r.images, 1))]
    assert [int(frame[image == i].max()) + 1 for i in image.unique().tolist()] == frames


@pytest.mark.parametrize("rows", [ROWS, VIDEO_ROWS], ids=["images", "videos"])
def test_projector_of_vit_features_gives_the_llm_tokens(rows):
    """A token's captured 2x2 patch features through ``downsample`` + ``merger`` reproduce its LLM input
    embedding (images here; the matrix's video prompts in tests/test_adapters.py)."""
    model = _model()
    for got in ta._probe(model, make_inputs(model, rows)):
        torch.testing.assert_close(got["projector"](got["vit_features"]), got["tokens"], atol=1e-5, rtol=1e-4)


def test_received_attention_is_a_distribution_per_frame():
    """The ViT attends within each temporal patch (a ``cu_seqlens`` segment per frame): each frame's tokens
    receive attention summing to 1 (under the default per-frame budget a span is a frame)."""
    model = _model()
    got = ta._probe(model, make_inputs(model, VIDEO_ROWS[:1]), extra=("received_attention",))[0]
    assert got["received"].shape[0] == 2  # 4 frames = 2 temporal patches
    torch.testing.assert_close(got["received"].sum(-1), torch.ones(2), atol=1e-5, rtol=0)


def test_matrix_rows_are_videos_and_image_rows_images():
    """The invariant matrix covers both modalities (a batch holds one): GLM-4.1V's row on videos, its "glm4v-images"
    row on images."""
    assert all(r.video_frames and not r.images for r in rows_for(_model()))
    images = inv._model("glm4v-images", "sdpa")
    assert images is not _model() and all(r.images and not r.video_frames for r in rows_for(images))


# --------------------------------------------------------------------------------------------- video inputs
def test_video_placeholder_is_the_processors_replace_video_token():
    """One ``<|begin_of_image|><|image|>*n<|end_of_image|>{int seconds}`` block per temporal patch, its time the
    first frame's (``metadata.timestamps[::2]``), padded with the last: transformers' ``replace_video_token``."""
    from transformers import Glm4vProcessor
    from transformers.video_utils import VideoMetadata

    from vtprune.adapters.glm4v import Glm4vVideo

    fmt = Glm4vVideo()
    proc = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2), image_token=fmt.image_token)
    proc.replace_frame_token_id = lambda ts, num_image_tokens: Glm4vProcessor.replace_frame_token_id(
        proc, ts, num_image_tokens=num_image_tokens)
    b = types.SimpleNamespace(tokenizer=None, frames=types.SimpleNamespace(merge_size=2, temporal_patch_size=2))
    for n, fps, t in ((8, 2.0, 4), (6, 0.7, 3), (5, 3.0, 3), (4, 1.0, 5)):  # the last: fewer times than patches
        idx = list(range(0, 3 * n, 3))
        meta = VideoMetadata(total_num_frames=3 * n, fps=fps, frames_indices=idx)
        grid = torch.tensor([[t, 4, 6]])
        ref = Glm4vProcessor.replace_video_token(proc, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)
        assert fmt.placeholder(b, {"video_grid_thw": grid}, meta.timestamps) == ref


def test_video_pixels_are_the_video_processors():
    """Resize (``smart_resize`` over the whole clip) and packing (``patchify``) are transformers' own; the video
    processor's module imports without torchvision, its class does not run here."""
    from PIL import Image
    from transformers import Glm4vImageProcessorPil
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor, smart_resize

    from vtprune import video as V

    pre = V.FramePreprocessor.defaults("glm4v")
    assert pre.size == Glm4vVideoProcessor.size
    assert list(pre.mean) == list(Glm4vVideoProcessor.image_mean)
    assert list(pre.std) == list(Glm4vVideoProcessor.image_std)
    rng = np.random.default_rng(0)
    for h, w, f in zip(rng.integers(20, 2000, 60), rng.integers(20, 2000, 60), rng.integers(2, 600, 60)):
        h, w, f = int(h), int(w), int(f)
        assert pre.target_hw(h, w, f) == smart_resize(f, h, w, temporal_factor=2, factor=28,
                                                      min_pixels=pre.size["shortest_edge"],
                                                      max_pixels=pre.size["longest_edge"])
    frames = rng.integers(0, 256, (5, 60, 90, 3), dtype=np.uint8)  # odd: the last frame repeated
    small = V.FramePreprocessor("glm4v", {"shortest_edge": 56 * 56, "longest_edge": 5 * 56 * 84})
    mine = small(frames)
    x = small.normalise(np.stack([np.asarray(Image.fromarray(f).resize((84, 56), resample=3)) for f in frames]))
    ref, t, gh, gw = Glm4vVideoProcessor.patchify(None, x[None], 14, 2, 2)
    assert small.target_hw(60, 90, 5) == (56, 84) and (t, gh, gw) == (3, 4, 6)
    assert torch.equal(mine["video_grid_thw"], torch.tensor([[t, gh, gw]]))
    assert torch.equal(mine["pixel_values_videos"], ref[0])
    # an image is a video of 2 identical frames: the PIL image processor resizes and normalises as we do
    one = rng.integers(0, 256, (120, 161, 3), dtype=np.uint8)
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    hf = Glm4vImageProcessorPil(size=size)(images=[Image.fromarray(one)], return_tensors="pt")
    mine = V.FramePreprocessor("glm4v", size)(np.stack([one, one]))
    assert torch.equal(mine["video_grid_thw"], hf["image_grid_thw"])
    torch.testing.assert_close(mine["pixel_values_videos"], hf["pixel_values"], atol=1e-5, rtol=0)


def test_video_qa_runs_glm4v(tmp_path):
    """``vtprune video-qa`` on the tiny model: decoded frames -> GLM's per-temporal-patch prompt -> pruned
    generate; each temporal patch keeps its per-frame budget."""
    from vtprune import synthetic_video as SV
    from vtprune import video_qa as qa

    pytest.importorskip("av")
    data = tmp_path / "data"
    SV.generate(data, n=2, seed=0, frames=16, fps=8.0, width=96, height=64)
    out = tmp_path / "run"
    argv = ["--model", "tiny:glm4v", "--data", str(data / "annotations.json"), "--method", "kcenter", "--ratio",
            "0.75", "--frames", "4", "--out", str(out), "--max-new-tokens", "3", "--no-progress"]
    assert qa.main(argv) == 0
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    per_patch = recs[0]["visual_before"] // 2  # 4 frames = 2 temporal patches
    assert per_patch > 1 and all(r["visual_before"] == 2 * per_patch and r["frames"] == 4 for r in recs)
    assert all(r["visual_after"] == 2 * Budget(ratio=0.75).count(per_patch) for r in recs)


# ------------------------------------------------------------------------------------------------ lmms-eval
def test_lmms_eval_wrapper_validates_before_loading():
    pytest.importorskip("lmms_eval")
    from vtprune.integrations.lmms_eval import PruningMixin, model_class

    cls = model_class("vtprune_glm4v")
    assert issubclass(cls, PruningMixin) and cls.__mro__[2].__name__ == "GLM4V"
    with pytest.raises(ValueError, match=r"unknown model_args 'bogus'.*max_new_tokens.*pretrained"):
        cls(pretrained="/nonexistent/model", method="random", keep=4, bogus=1)
