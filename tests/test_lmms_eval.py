"""The lmms-eval integration, end to end and offline: real ``simple_evaluate`` runs on the synthetic VQA task
whose reported scores must equal a direct computation on the same samples.

Set-up: ``scripts/setup_lmms_eval.sh .venv`` (``make test`` runs it). The sweep runs ``vtprune.eval_runner``
in a subprocess with the offline variables and a temporary HF_HOME, exactly as ``vtprune eval`` runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

import vtprune  # noqa: E402
from vtprune.synthetic.eval import evaluate  # noqa: E402
from vtprune.synthetic.scenes import heldout  # noqa: E402
from vtprune.synthetic.tokenizer import prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "synthetic-llava"
N, BATCH = 12, 4
OVERLAYS = 2  # --save-overlays: the first documents of each pruned setting get a kept-token PNG
# (method spec for the runner, vtprune.prune kwargs for the direct computation, visual tokens expected after)
SETTINGS = {
    "baseline": (None, None, 576),
    "kcenter keep=64": ("kcenter", {"method": "kcenter", "keep": 64}, 64),
    "random ratio=0.75": ("random", {"method": "random", "ratio": 0.75}, 144),
    "fastv keep=64": ("fastv:layer=2", {"method": "fastv", "keep": 64, "layer": 2}, 64),
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LLaVA-1.5-geometry model (576 visual tokens) with the synthetic processor, saved.
    Weights are drawn with std 0.5 so that its answers vary with the input (std 0.02 answers one word)."""
    from vtprune.synthetic.model import ModelSpec, build_model
    from vtprune.synthetic.tokenizer import build_processor

    path = tmp_path_factory.mktemp("tiny_llava")
    processor = build_processor()
    spec = ModelSpec(vit_hidden=32, vit_layers=2, vit_heads=2, llm_hidden=64, llm_layers=3, llm_heads=4,
                     llm_kv_heads=2, llm_intermediate=128)
    model = build_model(spec, processor.tokenizer, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _run_sweep(model_dir: Path, out: Path, methods: list[str], keeps: str, ratios: str, n: int) -> Path:
    env = {**os.environ, **OFFLINE, "HF_HOME": str(out / "hf_home")}
    cmd = [sys.executable, "-m", "vtprune.eval_runner", "--model", str(model_dir), "--tasks", "synthetic_vqa",
           "--methods", ",".join(methods), "--keeps", keeps, "--ratios", ratios, "--limit", str(n),
           "--batch-size", str(BATCH), "--device", "cpu", "--out", str(out),
           "--hf-home", str(out / "hf_home"), "--save-overlays", str(OVERLAYS)]
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def sweep(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "out"
    # kcenter with keep=64 only and random with ratio=0.75 only would need two runs; one run with both budgets
    # for every method covers the settings under test (extra rows are ignored).
    return _run_sweep(tiny_dir, out, ["kcenter", "random", "fastv:layer=2"], "64", "0.75", N)


def _samples(out: Path) -> dict[str, list[dict]]:
    by_setting: dict[str, list[dict]] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_setting.setdefault(row["setting"], []).append(row)
    return {k: sorted(v, key=lambda r: r["doc_id"]) for k, v in by_setting.items()}


def _scores(out: Path) -> dict[str, float]:
    import csv

    with (out / "results.csv").open() as f:
        return {("baseline" if r["method"] == "none" else f"{r['method']} {r['budget']}"): float(r["score"])
                for r in csv.DictReader(f)}


def _direct(model_dir: Path, setting: dict | None, n: int, batch: int):
    """vtprune.synthetic.eval on the same held-out samples, pruned the same way, no lmms-eval involved."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    samples = heldout(n)
    handle = None
    if setting is not None:
        kw = dict(setting)
        handle = vtprune.prune(model, kw.pop("method"), **kw)
    result = evaluate(model, processor, samples, batch_size=batch)
    if handle is not None:
        handle.remove()
    return samples, result, processor


def test_sweep_scores_equal_direct_computation(sweep: Path, tiny_dir: Path) -> None:
    samples_by_setting, scores = _samples(sweep), _scores(sweep)
    assert set(SETTINGS) <= set(samples_by_setting), sorted(samples_by_setting)
    for label, (_, direct_kw, _) in SETTINGS.items():
        logged = samples_by_setting[label]
        samples, result, _ = _direct(tiny_dir, direct_kw, N, BATCH)
        assert [r["doc_id"] for r in logged] == list(range(N))
        assert [r["target"] for r in logged] == [s.answer for s in samples]
        assert [r["response"] for r in logged] == result.predictions, label  # same predictions ...
        by_hand = sum(p == s.answer for p, s in zip(result.predictions, samples, strict=True)) / N
        assert scores[label] == pytest.approx(result.accuracy), label  # ... and the same score,
        assert scores[label] == pytest.approx(by_hand), label  # also when scored by hand
    # the tiny model's answers vary, so the comparison above is not trivially constant
    assert len({r["response"] for r in samples_by_setting["baseline"]}) > 2


def test_sweep_reports_kept_visual_tokens_per_sample(sweep: Path, tiny_dir: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    samples_by_setting = _samples(sweep)
    lengths = [len(processor(images=[s.image], text=[prompt(s.question)])["input_ids"][0])
               for s in heldout(N)]
    for label, (_, _, kept) in SETTINGS.items():
        for row, length in zip(samples_by_setting[label], lengths, strict=True):
            assert row["visual_before"] == 576 and row["visual_after"] == kept, (label, row)
            assert row["prompt_tokens"] == length, (label, row)  # the record belongs to this document
            assert row["prefill_ms"] > 0 and row["batch_rows"] == BATCH
    fastv = samples_by_setting["fastv keep=64"][0]
    assert fastv["mean_visual_per_layer"] == pytest.approx((2 * 576 + 64) / 3)  # layers 0-1 see all 576
    table = (sweep / "results.md").read_text()
    header = "| task | metric | method | budget | score | % of baseline | visual tokens kept | prefill ms |"
    assert header in table
    assert "| synthetic_vqa | exact_match | kcenter | keep=64 |" in table and "64.0 / 576.0" in table


def test_sweep_saves_overlays_of_the_first_documents(sweep: Path) -> None:
    from PIL import Image

    for setting, rows in _samples(sweep).items():
        drawn = [r for r in rows if r.get("overlay")]
        if setting == "baseline":
            assert not drawn  # nothing pruned, nothing to show
            continue
        assert [r["doc_id"] for r in drawn] == list(range(OVERLAYS)), setting
        for r in drawn:
            path = sweep / r["overlay"]
            assert path.is_file() and path.resolve().is_relative_to(sweep.resolve() / "overlays")
            with Image.open(path) as im:
                assert im.width > 100 and im.height > 100


def test_llava_hf_wrapper_in_process(sweep: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    """lmms-eval's own llava_hf class, wrapped: one loaded model, two settings, ``clean()`` in between."""
    for k, v in {**OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(k, v)
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from vtprune.integrations.lmms_eval import model_class

    lm = model_class("vtprune_llava_hf")(pretrained=str(tiny_dir), device="cpu", method="none")
    tm = TaskManager("WARNING", include_path=str(sweep / "tasks"), include_defaults=False)
    n = 6
    # generate() runs the vision tower before its first forward; prefill_ms must still include it
    vision = lm.model.model.vision_tower.register_forward_hook(lambda *_: time.sleep(0.03))
    for label in ("baseline", "kcenter keep=64"):
        _, direct_kw, kept = SETTINGS[label]
        if direct_kw is None:
            lm.configure(None)
        else:
            lm.configure(**direct_kw)
        res = evaluator.simple_evaluate(model=lm, tasks=["synthetic_vqa"], task_manager=tm, limit=n,
                                        log_samples=True, verbosity="ERROR", bootstrap_iters=0)
        samples, result, _ = _direct(tiny_dir, direct_kw, n, 1)
        logged = sorted(res["samples"]["synthetic_vqa"], key=lambda s: s["doc_id"])
        assert [(s["filtered_resps"][0].split() or [""])[0] for s in logged] == result.predictions, label
        assert res["results"]["synthetic_vqa"]["exact_match,none"] == pytest.approx(result.accuracy)
        records = sorted(lm.sample_records(), key=lambda r: r["doc_id"])
        assert [r["doc_id"] for r in records] == list(range(n))  # the parent sorts by length; mapping holds
        assert all(r["visual_after"] == kept and r["batch_rows"] == 1 for r in records)
        assert all(r["prefill_ms"] >= 30 for r in records), [r["prefill_ms"] for r in records]
        assert lm.model is not None  # simple_evaluate called clean(); the model survived it
    vision.remove()


def test_unknown_and_invalid_model_args_fail_before_loading() -> None:
    from vtprune.integrations.lmms_eval import VTPruneHF, model_class, parse_model_args

    missing = "/nonexistent/model"  # any load attempt would raise OSError, not ValueError
    with pytest.raises(ValueError, match=r"unknown model_args 'foo'.*allowed: model: .*pretrained.*variant"):
        VTPruneHF(pretrained=missing, method="kcenter", ratio=0.5, foo=1)
    # the allowed list comes from the parent's signature
    with pytest.raises(ValueError, match=r"'bogus'.*max_frames_num"):
        model_class("vtprune_llava_hf")(pretrained=missing, method="random", keep=4, bogus=1)
    with pytest.raises(ValueError, match=r"kcentre"):
        VTPruneHF(pretrained=missing, method="kcentre", ratio=0.5)
    with pytest.raises(ValueError, match=r"ratio.*without method="):
        VTPruneHF(pretrained=missing, ratio=0.5)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        VTPruneHF(pretrained=missing, method="random", ratio=1.5)
    with pytest.raises(ValueError, match=r"needs a budget"):
        VTPruneHF(pretrained=missing, method="random")
    with pytest.raises(ValueError, match=r"budget="):
        VTPruneHF(pretrained=missing, method="random", ratio=0.5, budget="per_crop")
    # values arrive as lmms-eval parses them: lists in brackets or with semicolons, numbers cast
    args = {"pretrained": "x", "method": "transition", "layer": "[7,9,12]", "ratio": 0.5}
    cfg, rest = parse_model_args(args, allowed={"pretrained"})
    assert cfg.method.layer == (7, 9, 12) and rest == {"pretrained": "x"}
    cfg, _ = parse_model_args({"method": "mmr", "lam": 0.25, "keep": 64.0, "budget": "global"}, allowed=())
    assert (cfg.method.name, cfg.method.lam, cfg.method.keep, cfg.budget) == ("mmr", 0.25, 64, "global")
    cfg, _ = parse_model_args({"method": "divprune", "keep": 64}, allowed=())  # aliases resolve
    assert cfg.method.name == "kcenter" and cfg.label == "kcenter keep=64"
    cfg, _ = parse_model_args({"method": "kcenter", "keep": 64, "newlines": "all"}, allowed=())  # the vLLM rule
    assert cfg.newlines == "all" and cfg.label == "kcenter(newlines=all) keep=64" and cfg.to_dict()["newlines"] == "all"
    with pytest.raises(ValueError, match=r"newlines='some'.*row, all"):
        VTPruneHF(pretrained=missing, method="random", ratio=0.5, newlines="some")


def _fake_distribution(root: Path) -> None:
    """A dist-info declaring our entry point, as ``pip install -e .`` writes it once pyproject has it."""
    info = root / "vtprune_ep_probe-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vtprune-ep-probe\nVersion: 0.0\n")
    entry = "vtprune = vtprune.integrations.manifest:manifests"
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{entry}\n")


def test_entry_point_payload_registers_every_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from vtprune.integrations import lmms_eval as plugin
    from vtprune.integrations.manifest import MODELS

    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("vtprune") is plugin.VTPruneHF
    assert set(MODELS) <= set(registry.list_canonical_model_ids())
    assert registry.resolve("vtprune_internvl_hf").model_type == "chat"
    assert registry.resolve("vtprune_llava_hf", force_simple=True).class_path.endswith(".VTPruneLlavaHf")
    wrapped = registry.get_model_class("vtprune_llava_hf", force_simple=True)  # imports lmms-eval's llava_hf
    assert issubclass(wrapped, plugin.PruningMixin) and wrapped.__mro__[2].__name__ == "LlavaHf"


def test_installed_entry_point_resolves() -> None:
    """``lmms_eval.models.get_model("vtprune")`` through the installed package metadata."""
    from importlib.metadata import entry_points

    group = entry_points(group="lmms_eval.models")
    if not any(ep.value.startswith("vtprune.integrations") for ep in group):
        pytest.skip("the lmms_eval.models entry point is not installed (pyproject.toml + pip install -e .)")
    from lmms_eval.models import get_model

    from vtprune.integrations.lmms_eval import VTPruneHF

    assert get_model("vtprune") is VTPruneHF


@pytest.mark.skipif(not (TRAINED / "config.json").exists(), reason="models/synthetic-llava not trained yet")
def test_trained_synthetic_model_scores_equal_direct_computation(tmp_path: Path) -> None:
    n = 40
    out = _run_sweep(TRAINED, tmp_path / "out", ["kcenter"], "64", "0.75", n)
    samples_by_setting, scores = _samples(out), _scores(out)
    for label in ("baseline", "kcenter keep=64"):
        samples, result, _ = _direct(TRAINED, SETTINGS[label][1], n, BATCH)
        assert [r["response"] for r in samples_by_setting[label]] == result.predictions, label
        assert scores[label] == pytest.approx(result.accuracy), label
        assert all(r["visual_after"] == SETTINGS[label][2] for r in samples_by_setting[label])
    assert scores["baseline"] > 0.3  # far above chance (1/2 .. 1/9 by question type): the model is trained


@pytest.mark.parametrize("path", sorted((ROOT / "eval" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_sweep_configs_are_valid(path: Path) -> None:
    """Every shipped config parses, names known models, tasks and methods, and its settings validate."""
    from vtprune.eval_runner import build_parser, settings_of, spec_from_args
    from vtprune.integrations.manifest import MODELS

    spec = spec_from_args(build_parser().parse_args(["--config", str(path)]))
    settings = settings_of(spec)
    assert spec.model_class in MODELS and spec.tasks and spec.methods
    budgets = len(spec.ratios) + len(spec.keeps)
    assert settings[0].method is None and len(settings) == 1 + len(spec.methods) * budgets


def test_core_package_does_not_import_lmms_eval() -> None:
    code = ("import sys, vtprune, vtprune.api, vtprune.eval_runner, vtprune.integrations; "
            "import vtprune.integrations.manifest; assert 'lmms_eval' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **OFFLINE}, timeout=120)
    assert importlib.util.find_spec("torchvision") is None  # setup_lmms_eval.sh must never install it
