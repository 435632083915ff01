"""``vtprune report``: the HTML page of an output directory — hand-made eval, video-qa and demo directories, a real
(tiny) ``vtprune eval`` run, and the page as headless Chromium renders it (skipped without chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vtprune.report import main, render

CHROMIUM = shutil.which("chromium")
EVIL_Q = "<script>alert('q')</script> is the <b>red</b> shape left & up?"
EVIL_R = '<img src=x onerror="alert(1)">'


class _Page(HTMLParser):
    """The results table's cell texts, every <img>'s src, and the scripts' sources."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[list[str]] = []
        self.imgs: list[str] = []
        self.scripts = 0
        self._in_results = self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("class") == "results":
            self._in_results = True
        elif tag == "tr" and self._in_results:
            self.results.append([])
        elif tag == "td" and self._in_results:
            self._in_cell = True
            self.results[-1].append("")
        elif tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "script":
            self.scripts += 1
            assert "src" not in a, "no external scripts"

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_results = False
        elif tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell and self._in_results:
            self.results[-1][-1] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.results = [r for r in page.results if r]  # the header row has <th> cells only
    return page


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, colour)
    ImageDraw.Draw(im).rectangle((8, 8, size[0] // 2, size[1] // 2), fill=(255 - colour[0], 40, 200))
    im.save(path)
    return path


SETTINGS = [  # method, budget, score, kept, per-layer mean, prefill ms
    ("none", "-", 0.75, 576.0, 576.0, 200.0),
    ("random", "keep=64", 0.5, 64.0, 64.0, 60.0),
    ("kcenter", "keep=64", 0.75, 64.0, 64.0, 70.0),
    ("fastv(layer=3)", "keep=64", 0.25, 64.0, 320.0, 120.0),
]


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    """An eval output directory as vtprune eval writes it (its own table writer), with overlays for kcenter, one
    overlay that is missing, hostile text, and an extra plot."""
    from vtprune.eval_runner import write_tables

    out = tmp_path / "eval"
    out.mkdir()
    rows = []
    for method, budget, score, kept, per_layer, ms in SETTINGS:
        rows.append({"task": "synthetic_vqa", "metric": "exact_match", "method": method, "budget": budget,
                     "score": score, "stderr": 0.1, "pct_of_baseline": 100 * score / 0.75, "visual_kept": kept,
                     "visual_before": 576.0, "mean_visual_per_layer": per_layer, "prefill_ms": ms,
                     "select_ms": 0.5, "n": 4, "batch_size": 1, "model": "tiny<model>", "model_class": "vtprune",
                     "config": "{}"})
    write_tables(rows, out)
    spec = {"model": "models/tiny<model>", "model_class": "vtprune", "tasks": ["synthetic_vqa"],
            "methods": [{"method": "random"}, {"method": "kcenter"}, {"method": "fastv", "layer": 3}], "ratios": [],
            "keeps": [64], "budget": "per_frame", "positions": "original", "limit": 4, "batch_size": 1,
            "device": "cpu", "seed": 0}
    (out / "results.json").write_text(json.dumps({"spec": spec, "settings": [
        {"setting": "baseline" if m == "none" else f"{m} {b}"} for m, b, *_ in SETTINGS], "wall_s": 3.5}))
    lines = []
    for method, budget, *_ in SETTINGS:
        setting = "baseline" if method == "none" else f"{method} {budget}"
        for doc in range(3):
            line = {"setting": setting, "method": method, "budget": budget, "task": "synthetic_vqa", "doc_id": doc,
                    "question": EVIL_Q if doc == 0 else f"question {doc}?", "target": "red",
                    "response": EVIL_R if (doc == 0 and method == "random") else ("red" if doc else "blue"),
                    "exact_match": float(doc > 0), "prefill_ms": 50.0, "visual_before": 576, "visual_after": 64}
            if method == "kcenter" and doc < 2:
                line["overlay"] = str(_png(out / "overlays" / f"kcenter_{doc}.png", (30, 120 + 60 * doc, 30))
                                      .relative_to(out))
            if method == "fastv(layer=3)" and doc == 0:
                line["overlay"] = "overlays/not_written.png"
            lines.append(json.dumps(line))
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    _png(out / "extra_plot.png", (250, 250, 240), (160, 100))
    return out


def test_page_of_an_eval_directory(eval_dir: Path) -> None:
    assert main([str(eval_dir)]) == 0
    text = (eval_dir / "report.html").read_text()
    page = _parse(text)
    # the table: one row per setting, in the CSV's order, with the formatted values
    assert [r[2:4] for r in page.results] == [[m, b] for m, b, *_ in SETTINGS]
    by_method = {r[2]: r for r in page.results}
    assert by_method["kcenter"][4] == "0.7500 ± 0.1000" and by_method["kcenter"][5] == "100"
    assert by_method["random"][5] == "66.7" and by_method["random"][6] == "64 / 576"
    assert by_method["fastv(layer=3)"][6] == "64 / 576 (320 avg/layer)" and by_method["none"][7] == "200"
    # images: one generated figure for the task, the extra PNG, two overlays; every one embedded
    assert len(page.imgs) == 4
    assert all(src.startswith("data:image/") and ";base64," in src for src in page.imgs)
    assert not re.search(r"(src|href)=\"(?!data:)", text)
    assert "http" not in re.sub(r"data:[^\"]+", "", text)  # no URL outside the data URIs
    # text is escaped
    assert "<script>alert" not in text and EVIL_R not in text and "<b>red</b>" not in text
    assert "&lt;script&gt;alert(&#x27;q&#x27;)&lt;/script&gt;" in text and "&lt;img src=x" in text
    assert "models/tiny&lt;model&gt;" in text
    # what is missing is said
    assert "1 overlay file(s) named in samples.jsonl do not exist" in text
    assert "no overlays saved" not in text
    assert text.count('class="doc"') == 3 and "settings differ" in text


def test_missing_parts_and_max_samples(eval_dir: Path, tmp_path: Path) -> None:
    lines = [json.loads(x) for x in (eval_dir / "samples.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("overlay", None)
        line.pop("question")
    (eval_dir / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"cut short\n')
    (eval_dir / "results.json").unlink()
    out = tmp_path / "elsewhere" / "r.html"
    assert main([str(eval_dir), "--out", str(out), "--max-samples", "2"]) == 0
    text = out.read_text()
    for said in ("no overlays saved: run vtprune eval --save-overlays N", "no results.json",
                 "no questions in samples.jsonl", "showing the first 2 of 3 documents (--max-samples 2)",
                 "1 line(s) were not JSON"):
        assert html_escaped(said) in text, said
    assert text.count('class="doc"') == 2 and 'class="gallery"' not in text
    assert main([str(tmp_path / "nothing here")]) == 2


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_page_of_video_qa_runs(tmp_path: Path) -> None:
    """A folder of video-qa run directories: one row per run, % of the unpruned run's accuracy."""
    root = tmp_path / "video_qa"
    for name, method, ratio, correct, kept in (("m-none-full", "none", None, [1, 1], 400),
                                               ("m-kcenter-r0.75", "kcenter", 0.75, [1, 0], 100)):
        d = root / name
        d.mkdir(parents=True)
        config = {"model": "tiny:qwen2_vl", "method": method, "ratio": ratio, "keep": None, "layer": None}
        recs = [{"id": f"q{i}", "video": "v.mp4", "question": f"what <happens> {i}?", "answer": "b",
                 "options": ["x", "y"], "kind": "action", "gold": "B", "prediction": "B" if c else "A",
                 "correct": bool(c), "visual_before": 400, "visual_after": kept, "prefill_ms": 10.0 + kept / 10,
                 "config": config} for i, c in enumerate(correct)]
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        acc = sum(correct) / len(correct)
        (d / "summary.json").write_text(json.dumps({"n": 2, "accuracy": acc, "accuracy_by_kind": {"action": acc},
                                                    "visual_before": 400, "visual_after": kept,
                                                    "prefill_ms": 10.0 + kept / 10, "config": config}))
    assert main([str(root)]) == 0
    text = (root / "report.html").read_text()
    rows = _parse(text).results
    overall = [r for r in rows if r[1] == "accuracy"]
    assert [r[1] for r in rows if r[1] != "accuracy"] == ["accuracy [action]"] * 2  # per kind of question
    assert [(r[2], r[3], r[4], r[5]) for r in overall] == [("none", "-", "1.0000", "100"),
                                                          ("kcenter", "ratio=0.75", "0.5000", "50")]
    assert "what &lt;happens&gt; 0?\nA. x\nB. y" in text and "✗ wrong" in text and "✓ right" in text
    assert text.count('class="doc"') == 2


def test_page_of_a_demo_directory(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.csv").write_text("method,budget,kept,per_layer,accuracy,retention,prefill_ms,speedup\n"
                                  "none,576,576,576.0,0.9,1.0,100.0,1.0\nkcenter,64,64,64.0,0.8,0.8889,20.0,5.0\n")
    _png(out / "demo.png", (200, 220, 255))
    assert main([str(out)]) == 0
    page = _parse((out / "report.html").read_text())
    assert [r[2] for r in page.results] == ["none", "kcenter"] and page.results[1][5] == "88.9"
    assert len(page.imgs) == 1 and page.imgs[0].startswith("data:image/png;base64,")  # its own plot, no other


def test_cli_dispatches_report(eval_dir: Path) -> None:
    from vtprune.cli import main as cli_main

    assert cli_main(["report", str(eval_dir), "--max-samples", "1"]) == 0
    assert (eval_dir / "report.html").stat().st_size > 1000


# ---------------------------------------------------------------------------- a real vtprune eval run
@pytest.fixture(scope="module")
def real_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vtprune eval on a random tiny LLaVA-geometry model: baseline, random and kcenter at ratio 0.75, 4 documents."""
    pytest.importorskip("lmms_eval")
    from vtprune.synthetic.model import ModelSpec, build_model
    from vtprune.synthetic.tokenizer import build_processor

    base = tmp_path_factory.mktemp("report_eval")
    model_dir = base / "tiny"
    processor = build_processor()
    spec = ModelSpec(vit_hidden=32, vit_layers=2, vit_heads=2, llm_hidden=64, llm_layers=3, llm_heads=4,
                     llm_kv_heads=2, llm_intermediate=128)
    build_model(spec, processor.tokenizer, seed=0).eval().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = base / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "vtprune.eval_runner", "--model", str(model_dir), "--tasks", "synthetic_vqa",
           "--methods", "random,kcenter", "--ratios", "0.75", "--limit", "4", "--batch-size", "4", "--device", "cpu",
           "--out", str(out), "--hf-home", str(base / "hf_home")]
    proc = subprocess.run(cmd, env=env, cwd=base, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_page_of_a_real_eval_run(real_eval: Path) -> None:
    from vtprune.synthetic.scenes import heldout

    samples = [json.loads(x) for x in (real_eval / "samples.jsonl").read_text().splitlines()]
    questions = [s.question for s in heldout(4)]
    # eval_runner logs each document's prompt: the synthetic task's prompt is the question itself
    assert [s["question"] for s in samples if s["setting"] == "baseline"] == questions
    assert main([str(real_eval)]) == 0
    text = (real_eval / "report.html").read_text()
    page = _parse(text)
    assert [(r[2], r[3]) for r in page.results] == [("none", "-"), ("random", "ratio=0.75"),
                                                   ("kcenter", "ratio=0.75")]
    assert all(r[6] == ("576 / 576" if r[2] == "none" else "144 / 576") for r in page.results)
    assert len(page.imgs) == 1 and page.imgs[0].startswith("data:image/png;base64,")
    assert all(html_escaped(q) in text for q in questions) and text.count('class="doc"') == 4
    assert "no overlays saved" in text


# ---------------------------------------------------------------------------- in a browser
def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_page_renders_in_chromium(eval_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    assert main([str(eval_dir)]) == 0
    page = eval_dir / "report.html"
    n_imgs = len(_parse(page.read_text()).imgs)
    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri(), profile=tmp_path / "p1")
    assert shot.is_file(), proc.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2000)
    colours = im.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, "a blank or flat page"
    white = sum(c for c, rgb in colours if min(rgb) >= 250)
    assert white < 0.9 * im.size[0] * im.size[1]
    # every image decodes: the page's load handler counts the <img>s that are complete with a natural width
    proc = _chromium("--dump-dom", "--virtual-time-budget=5000", page.as_uri(), profile=tmp_path / "p2")
    status = re.search(r'<p id="img-status"[^>]*>', proc.stdout)
    assert status, proc.stdout[-2000:] + proc.stderr[-2000:]
    loaded = re.search(r'data-loaded="(\d+)"', status.group(0))
    total = re.search(r'data-total="(\d+)"', status.group(0))
    assert loaded and total, status.group(0)
    assert int(total.group(1)) == n_imgs == 4 and int(loaded.group(1)) == n_imgs
    assert f"{n_imgs} of {n_imgs} images decoded" in proc.stdout


def test_render_of_nothing_is_still_a_page(tmp_path: Path) -> None:
    from vtprune.report import Run

    text = render([Run("eval", tmp_path, "empty", notes=["no results.csv"])])
    assert text.startswith("<!DOCTYPE html>") and "no results table" in text and "no results.csv" in text
