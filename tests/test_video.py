"""Video: exact frame sampling on generated files (decord and PyAV), model inputs matching the HF
processors, per-frame budgets on video batches, the video-QA script end to end (and resumed), and the
synthetic video generator's determinism and answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

import vtprune  # noqa: E402
from vtprune import synthetic_video as SV  # noqa: E402
from vtprune import video as V  # noqa: E402
from vtprune.adapters.qwen2_vl import qwen_resize_hw  # noqa: E402
from vtprune.adapters.qwen3_vl import qwen3_group_times  # noqa: E402
from vtprune.budget import Budget  # noqa: E402
from vtprune.testing.tiny import Row, build, make_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, FPS = 48, 8.0  # frames and rate of the index-coded test videos
BACKENDS = V.available_backends()  # decord is optional


def _coded_frames() -> np.ndarray:
    """(N, 48, 64, 3): frame i is flat grey 8 + 4 i, so a decoded frame names its own index."""
    return np.stack([np.full((48, 64, 3), 8 + 4 * i, np.uint8) for i in range(N)])


def _decoded_index(frames: np.ndarray) -> list[int]:
    return np.round((frames.reshape(len(frames), -1).mean(1) - 8) / 4).astype(int).tolist()


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("coded")
    out = {}
    for codec in ("libx264", "mpeg4"):
        out[codec] = d / f"{codec}.mp4"
        assert SV.write_video(out[codec], _coded_frames(), FPS, codec) == codec
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synthetic")
    SV.generate(d, n=5, seed=0, frames=16, fps=8.0, width=96, height=64)
    return d


# ---------------------------------------------------------------------------------------------- sampling


def test_uniform_indices_are_linspace_rounded():
    assert V.uniform_indices(48, 8).tolist() == np.linspace(0, 47, 8).round().astype(int).tolist()
    assert V.uniform_indices(48, 8).tolist() == [0, 7, 13, 20, 27, 34, 40, 47]
    assert V.uniform_indices(5, 8).tolist() == [0, 1, 2, 3, 4]  # never repeats a frame
    assert V.uniform_indices(10, 1).tolist() == [0]
    with pytest.raises(ValueError):
        V.uniform_indices(0, 4)


def test_fps_indices_follow_the_time_grid():
    assert V.fps_indices(48, 8.0, 2.0).tolist() == list(range(0, 48, 4))  # t = 0, 0.5, ..., 5.5 s
    assert V.fps_indices(48, 8.0, 3.0).tolist() == [int(8 * k / 3 + 1e-6) for k in range(18)]  # floor(t * 8)
    assert V.fps_indices(48, 8.0, 16.0).tolist() == list(range(48))  # above the video's rate: every frame once
    assert V.fps_indices(48, 8.0, 1.0, max_frames=4).tolist() == [0, 16, 24, 40]  # [0, 8, .., 40] thinned evenly
    assert V.fps_indices(30, 29.97, 1.0).tolist() == [0, 29]  # NTSC rate: the frame on screen at t = 1 s
    assert V.fps_indices(4, 8.0, 1.0, min_frames=2).tolist() == [0, 3]  # too short: uniform fallback
    with pytest.raises(ValueError, match="not both"):
        V.sample_indices(V.VideoInfo("x", 48, 8.0, 64, 48, "pyav"), num_frames=4, fps=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_sampling_is_exact(coded, codec, backend):
    info = V.probe(coded[codec], backend)
    assert (info.num_frames, info.fps, info.width, info.height, info.backend) == (N, FPS, 64, 48, backend)
    clip = V.load_video(coded[codec], num_frames=8, backend=backend)
    assert _decoded_index(clip.frames) == clip.indices.tolist() == V.uniform_indices(N, 8).tolist()
    assert clip.frames.shape == (8, 48, 64, 3) and clip.frames.dtype == np.uint8
    clip = V.load_video(coded[codec], fps=2.0, backend=backend)
    assert _decoded_index(clip.frames) == clip.indices.tolist() == list(range(0, N, 4))
    np.testing.assert_allclose(clip.timestamps, np.arange(12) * 0.5)
    assert clip.sampled_fps == pytest.approx(2.0)
    frames = V.read_frames(coded[codec], [30, 3, 3, 47], backend)  # any order, repeats
    assert _decoded_index(frames) == [30, 3, 3, 47]


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both decord and PyAV")
def test_backends_decode_identical_frames(synthetic):
    video = synthetic / "videos" / "0-00000.mp4"
    a, b = (V.load_video(video, num_frames=6, backend=be) for be in ("decord", "pyav"))
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.indices, b.indices)


def test_missing_file_and_backend_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        V.probe(tmp_path / "none.mp4")
    with pytest.raises(ValueError, match="backend"):
        V.resolve_backend("opencv")


# ------------------------------------------------------------------------------------------- model inputs


def test_pixels_match_the_hf_pil_image_processors():
    """Video processors need torchvision; the frame pipeline is checked against the image processors that
    share its resize / normalisation / patch layout (a Qwen image is a video of 2 identical frames)."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, Qwen2VLImageProcessorPil

    frame = np.random.default_rng(0).integers(0, 256, (120, 161, 3), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)(images=[Image.fromarray(frame)],
                                                                              return_tensors="pt")
    mine = V.FramePreprocessor("qwen2_vl", {"shortest_edge": 56 * 56, "longest_edge": 112 * 112})(frame[None])
    assert torch.equal(mine["video_grid_thw"], ref["image_grid_thw"])
    torch.testing.assert_close(mine["pixel_values_videos"], ref["pixel_values"], atol=1e-5, rtol=0)
    for family, kw in (("llava_next_video", dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})),
                       ("llava_onevision", dict(size={"height": 384, "width": 384}, do_center_crop=False))):
        ref = CLIPImageProcessorPil(**kw)(images=[Image.fromarray(frame)], return_tensors="pt")["pixel_values"]
        mine = V.FramePreprocessor.defaults(family)(np.stack([frame, frame]))["pixel_values_videos"]
        assert mine.shape == (1, 2, *ref.shape[1:])
        torch.testing.assert_close(mine[0, 1:], ref, atol=1e-5, rtol=0)


def test_qwen_resize_matches_transformers():
    """Qwen2/2.5-VL bound one frame's area, Qwen3-VL the whole clip's (its module imports without torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as per_frame
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as per_clip

    rng = np.random.default_rng(0)
    for h, w, t in zip(rng.integers(20, 1200, 60), rng.integers(20, 1200, 60), rng.integers(2, 64, 60)):
        h, w, t = int(h), int(w), int(t)
        lo, hi = 128 * 28 * 28, 768 * 28 * 28
        assert qwen_resize_hw(h, w, factor=28, min_pixels=lo, max_pixels=hi) == per_frame(h, w, 28, lo, hi)
        lo, hi = 128 * 32 * 32, 768 * 32 * 32
        assert qwen_resize_hw(h, w, factor=32, min_pixels=lo, max_pixels=hi, num_frames=t) == per_clip(
            t, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi)
    assert qwen3_group_times([0.0, 0.5, 1.0]) == [0.25, 1.0]  # last frame repeated to fill its patch


def _frame_spans(handle) -> list:
    return [s for s in handle.stats.stages[0].spans if s.frame >= 0 and s.n > 0]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision", "llava_next_video"])
def test_video_batch_keeps_per_frame_budgets(family):
    model = build(family)
    qwen = family.startswith("qwen")
    images = 0 if qwen else 1  # tiny LLaVA batches need an image; videos follow the batch's images
    rows = [Row(before=3 + 2 * s, after=4, images=images, video_frames=4, image_size=(56, 56), seed=s) for s in (0, 1)]
    inputs = make_inputs(model, rows)
    budget = Budget(ratio=0.75, policy="per_frame")
    with vtprune.prune(model, "kcenter", ratio=0.75, budget="per_frame") as h, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    spans = [s for s in _frame_spans(h) if s.image >= 2 * images]
    frames = 2 if qwen else 4  # Qwen: a frame is a temporal patch of 2 frames
    assert [sum(s.row == r for s in spans) for r in (0, 1)] == [frames, frames]
    assert all(s.kept == s.budget == budget.count(s.n) and s.n > 1 for s in spans)
    assert all(s.kept == budget.count(s.n) for s in _frame_spans(h))  # the images too
    if qwen:  # (LLaVA's visual_after also counts the structural newline tokens that survive)
        assert h.stats.visual_after == [sum(s.kept for s in spans if s.row == r) for r in (0, 1)]


@pytest.mark.parametrize("family", V.video_families())
def test_decoded_video_inputs_run_and_keep_per_frame_budgets(synthetic, family):
    item = json.loads((synthetic / "annotations.json").read_text())["items"][0]
    clip = V.load_video(synthetic / item["video"], num_frames=6)
    model = build(family)
    builder = V.tiny_builder(model, [item["question"]], frames=6)
    inputs = builder(clip, item["question"])
    slot = builder.format.image_token if family == "glm4v" else builder.video_token  # GLM: frames on <|image|>
    n_vis = int((inputs["input_ids"] == builder.tokenizer.convert_tokens_to_ids(slot)).sum())
    assert n_vis == int(builder.placeholder(builder.frames(clip.frames), clip.timestamps).count(slot)) > 0
    method = vtprune.method("fastv", layer=2) if family == "qwen2_5_vl" else "kcenter"  # one in-LLM method too
    with vtprune.prune(model, method, keep=2) as h, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    spans = _frame_spans(h)
    assert [s.frame for s in spans] == list(range(3 if family.startswith(("qwen", "glm")) else 6))
    assert all(s.kept == min(2, s.n) for s in spans)
    assert h.stats.visual_before == [n_vis]  # (LLaVA-OneVision's: 6 frames x 4 + its structural newline)
    if family == "qwen3_vl":  # every temporal patch its own block, after its timestamp
        text = builder.tokenizer.decode(inputs["input_ids"][0]).replace(" ", "")  # word-level: spaces added
        assert "<0.2seconds><|vision_start|><|video_pad|>" in text and "<1.7seconds>" in text


def test_temporal_budget_gives_repeated_frames_fewer_tokens(synthetic):
    """budget="temporal" is passed through: a video's total is kept, a repeated temporal patch gets fewer."""
    clip = V.load_video(synthetic / "videos" / "0-00000.mp4", num_frames=8)
    clip.frames[2:4] = clip.frames[0:2]  # temporal patch 1 repeats patch 0
    model = build("qwen2_vl")
    inputs = V.tiny_builder(model)(clip, "Which colour moves left?")
    with vtprune.prune(model, "kcenter", ratio=0.5, budget="temporal") as h, torch.no_grad():
        model(**inputs)
    spans = _frame_spans(h)
    assert [s.frame for s in spans] == [0, 1, 2, 3]
    assert sum(s.kept for s in spans) == sum(Budget(ratio=0.5).count(s.n) for s in spans)
    # the first frame counts as fully novel; the exact repeat gets the fewest tokens, below its per-frame share
    assert spans[1].kept == min(s.kept for s in spans) < Budget(ratio=0.5).count(spans[1].n) < spans[0].kept


# ------------------------------------------------------------------------------------------------ script


def _script():
    import vtprune.video_qa

    return vtprune.video_qa


def test_scoring():
    qa = _script()
    item = {"question": "Which?", "answer": "red", "options": ["blue", "red", "green"]}
    assert qa.gold_letter(item) == "B" and qa.gold_letter({**item, "answer": "b"}) == "B"
    assert [qa.score(item, p)[1] for p in ("B", "(B)", "B. red", "The answer is B.", "red", "A", "I don't know")] == [
        True, True, True, True, True, False, False]
    assert qa.score({"answer": "Three objects", "options": None}, "three objects.")[1]
    assert qa.score({"answer": "3", "options": None}, "Three")[1]
    assert qa.parse_kv(["seed=1", "variant=todre", "layers=(7, 9)"]) == {"seed": 1, "variant": "todre",
                                                                       "layers": [7, 9]}  # cast by the field


def test_script_runs_offline_and_resumes(synthetic, tmp_path):
    qa = _script()
    out = tmp_path / "run"
    argv = ["--model", "tiny:qwen2_vl", "--data", str(synthetic / "annotations.json"), "--method", "kcenter",
            "--ratio", "0.75", "--frames", "4", "--out", str(out), "--max-new-tokens", "3", "--no-progress"]
    assert qa.main([*argv, "--limit", "2", "--save-overlays", "1"]) == 0
    first = (out / "predictions.jsonl").read_text().splitlines()
    assert len(first) == 2
    drawn = [json.loads(line).get("overlay") for line in first]
    assert drawn[0] and drawn[1] is None and (out / drawn[0]).is_file()  # the first question's frames
    (out / "predictions.jsonl").write_text("\n".join(first) + "\n" + first[1][:40])  # a run killed mid-write
    assert qa.main(argv) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 5 and lines[:2] == first  # the two answered items were not redone
    recs = [json.loads(line) for line in lines]
    per_patch = recs[0]["visual_before"] // 2  # 4 frames = 2 temporal patches
    assert all(r["visual_before"] == 2 * per_patch and r["frames"] == 4 for r in recs)
    assert all(r["visual_after"] == 2 * Budget(ratio=0.75).count(per_patch) for r in recs)
    assert all(r["prefill_ms"] > 0 and r["e2e_ms"] >= r["generate_ms"] > 0 and r["options"] for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5 and summary["resumed"] == 2
    assert 0.0 <= summary["accuracy"] <= 1.0 and set(summary["accuracy_by_kind"]) == set(SV.KINDS)
    with pytest.raises(SystemExit, match="other options"):
        qa.main(["0.5" if a == "0.75" else a for a in argv])


def test_script_loads_a_local_checkpoint_and_csv(synthetic, tmp_path):
    """The real-model path: AutoModel + tokenizer + chat template + video_preprocessor_config.json."""
    qa = _script()
    model = build("llava_next_video")
    items = json.loads((synthetic / "annotations.json").read_text())["items"]
    builder = V.tiny_builder(model, [it["question"] for it in items])
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    builder.tokenizer.save_pretrained(ckpt)
    (ckpt / "chat_template.jinja").write_text(builder.chat_template)
    (ckpt / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 56},
                                                                     "crop_size": {"height": 56, "width": 56}}))
    out = tmp_path / "run"
    qa.main(["--model", str(ckpt), "--data", str(synthetic / "annotations.csv"), "--method", "random",
             "--keep", "2", "--method-arg", "seed=3", "--fps", "4", "--max-frames", "5", "--out", str(out),
             "--max-new-tokens", "2", "--limit", "2", "--no-progress", "--save-overlays", "2"])
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all((out / r["overlay"]).is_file() for r in recs)
    assert [r["frame_indices"] for r in recs] == [[0, 4, 8, 10, 14]] * 2  # 4 fps of 8 fps: 8 samples thinned to 5
    assert all(r["visual_before"] == 5 * 4 and r["visual_after"] == 5 * 2 for r in recs)
    summary = qa.run(qa.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--model", str(ckpt), "--data", str(synthetic / "annotations.csv"), "--fps", "4", "--max-frames", "5",
         "--out", str(tmp_path / "full"), "--max-new-tokens", "2", "--limit", "2", "--no-progress"]))
    assert summary["n"] == 2 and summary["visual_before"] == summary["visual_after"] == 20  # --method none


# --------------------------------------------------------------------------------------------- synthetic


def _decode_all(path: Path) -> np.ndarray:
    """(F, H, W, 3) uint8: every frame of a video, decoded with PyAV."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_synthetic_generator_is_deterministic(synthetic, tmp_path):
    again = tmp_path / "again"
    SV.generate(again, n=5, seed=0, frames=16, fps=8.0, width=96, height=64)
    for name in ["annotations.json", "annotations.csv"]:
        assert (again / name).read_bytes() == (synthetic / name).read_bytes(), name
    for i in range(5):  # the same pixels; the encoder's bytes were seen to differ once under CI load
        a, b = (_decode_all(d / f"videos/0-{i:05d}.mp4") for d in (again, synthetic))
        assert a.shape == b.shape and np.abs(a.astype(np.int16) - b).mean() < 1.0, i
    other = [SV.make_item(i, seed=1)[0] for i in range(5)]
    assert [it.question for it in other] != [SV.make_item(i, seed=0)[0].question for i in range(5)] or \
        [it.answer for it in other] != [SV.make_item(i, seed=0)[0].answer for i in range(5)]


def _centroid(frame: np.ndarray, colour: str) -> np.ndarray | None:
    ys, xs = np.nonzero((frame == np.array(SV.COLOURS[colour], np.uint8)).all(-1))
    return np.array([xs.mean(), ys.mean()]) if len(xs) else None


def test_synthetic_answers_are_right():
    """Read each answer back from the rendered pixels (before encoding)."""
    for i in range(40):
        item, tracks = SV.make_item(i, seed=7)
        assert item.answer in item.options and len(set(item.options)) == len(item.options)
        frames = SV.render(tracks, item.frames, 160, 120)
        first, last = frames[0], frames[-1]
        if item.kind in ("direction_colour", "direction_of"):
            colour = item.answer if item.kind == "direction_colour" else item.question.split()[-3]
            move = _centroid(last, colour) - _centroid(first, colour)
            direction = item.question.split()[-1].rstrip("?") if item.kind == "direction_colour" else item.answer
            assert np.dot(move, SV.DIRECTIONS[direction]) > 20, (item, move)
        elif item.kind == "count":
            assert sum(_centroid(last, c) is not None for c in SV.COLOURS) == int(item.answer)
        elif item.kind == "first":
            on_first = [t.colour for t in tracks if t.start == min(t.start for t in tracks)]
            assert on_first == [item.answer]


def test_import_vtprune_does_not_import_video_readers():
    code = ("import sys, vtprune, vtprune.video, vtprune.synthetic_video; "
            "assert not {'av', 'decord'} & set(sys.modules), sorted({'av', 'decord'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("method", ["evs", "vidcom2", "dycoke", "fastvid", "holitom"])
def test_script_runs_the_video_methods(synthetic, tmp_path, method):
    """Every video method through `vtprune video-qa` (a whole video per span, counted by the method's rule)."""
    qa = _script()
    out = tmp_path / method
    assert qa.main(["--model", "tiny:qwen2_vl", "--data", str(synthetic / "annotations.json"), "--method", method,
                    "--ratio", "0.75", "--frames", "8", "--out", str(out), "--max-new-tokens", "2", "--limit", "1",
                    "--no-progress", "--save-overlays", "1"]) == 0
    (rec,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    n, T = rec["visual_before"], 4  # 8 frames = 4 temporal patches
    first = vtprune.method(method).video_count(Budget(ratio=0.75), n, T)
    assert rec["visual_after"] <= first < n and (out / rec["overlay"]).is_file()
