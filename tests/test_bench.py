"""The benchmarks end to end on small models: numbers come out, and the ones with a known value have it."""

from __future__ import annotations

import math

import pytest
import torch


def test_speed_bench_smoke_on_the_tiny_proxy(tmp_path):
    from vtprune.bench.speed import run

    rows = run(["tiny"], out_dir=tmp_path, reps=1, methods=[("kcenter", {}), ("fastv", {}), ("transition", {})],
               budgets=(64,), plot=False)
    by = {r["method"]: r for r in rows}
    assert by["none"]["kept"] == 576 and by["kcenter"]["kept"] == 64 and by["fastv"]["kept"] == 64
    for r in rows:  # every cache holds exactly the tokens its layer processed
        assert r["kv_vs_ideal"] == pytest.approx(1.0)
        assert r["prefill_raw_ms"] > 0 and r["speedup_scaled"] > 0 and math.isfinite(r["E_scaled"])
    # a cache holding fewer tokens: real-depth bytes shrink with the schedule
    assert by["kcenter"]["kv_bytes_scaled"] < by["fastv"]["kv_bytes_scaled"] < by["none"]["kv_bytes_scaled"]
    assert by["kcenter"]["flops_scaled"] < by["none"]["flops_scaled"]
    assert (tmp_path / "bench.csv").exists()


def test_bench_repeats_until_the_control_resolves_e(tmp_path):
    """E is paired per repetition (ideal and pruned back to back) and reported with its 95% CI; repetitions go on
    past the minimum until the unpruned-vs-itself control's CI is within ``spread`` (or max_reps)."""
    from vtprune.bench.speed import run

    kw = dict(out_dir=tmp_path, methods=[("kcenter", {})], budgets=(64,), plot=False)
    easy = {r["method"]: r for r in run(["tiny"], reps=3, max_reps=6, spread=1.0, **kw)}
    hard = {r["method"]: r for r in run(["tiny"], reps=3, max_reps=5, spread=1e-9, **kw)}
    assert easy["none"]["reps"] == 3 and hard["none"]["reps"] == 5 and hard["kcenter"]["reps"] == 5
    for rows in (easy, hard):
        control = rows["none"]
        assert math.isfinite(control["E_ci"]) and 0.5 < control["E_scaled"] < 2.0  # the model against itself
        assert 0 < rows["kcenter"]["E_parts"] <= 1.0


def test_selection_cost_bench_at_two_context_lengths(tmp_path):
    from vtprune.bench.speed import selection

    rows = selection("tiny", images=(1, 3), keep_per_image=16, reps=1, methods=[("kcenter", {}), ("fastv", {})],
                     out_dir=tmp_path)
    assert [(r["method"], r["n_visual"], r["keep"]) for r in rows] == [
        ("kcenter", 576, 16), ("fastv", 576, 16), ("kcenter", 1728, 48), ("fastv", 1728, 48)]
    for r in rows:
        assert r["select_ms"] > 0 and r["select_pct"] == pytest.approx(100 * r["select_ms"] / r["prefill_scaled_ms"])
    # the long context costs more to prefill
    assert rows[2]["prefill_scaled_ms"] > rows[0]["prefill_scaled_ms"]
    assert (tmp_path / "selection_tiny.csv").exists()


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    """A saved (untrained) model of the synthetic-VQA architecture, small."""
    from vtprune.synthetic.model import ModelSpec, build_model
    from vtprune.synthetic.tokenizer import build_processor

    path = tmp_path_factory.mktemp("synthetic") / "m"
    processor = build_processor()
    model = build_model(ModelSpec(vit_hidden=32, vit_layers=2, vit_heads=2, llm_hidden=64, llm_layers=3, llm_heads=4,
                                  llm_kv_heads=2, llm_intermediate=128), processor.tokenizer).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_demo_on_a_small_synthetic_model(small_synthetic, tmp_path):
    from vtprune.bench.demo import run

    rows = run(small_synthetic, n=4, budgets=(64,), methods=[("kcenter", {}), ("fastv", {})], reps=1,
               batch_size=4, out_dir=tmp_path, plot=False, progress=False)
    by = {r["method"]: r for r in rows}
    assert by["none"]["kept"] == 576 and by["kcenter"]["kept"] == 64 and by["fastv"]["kept"] == 64
    assert by["fastv"]["per_layer"] == pytest.approx((2 * 576 + 64) / 3)  # FastV K=2 of 3 layers
    for r in rows:
        assert r["prefill_ms"] > 0 and r["speedup"] > 0 and r["efficiency"] > 0
        if by["none"]["accuracy"]:
            assert r["retention"] == pytest.approx(r["accuracy"] / by["none"]["accuracy"])
    assert (tmp_path / "demo.csv").exists()


def test_accuracy_bench_on_a_small_synthetic_model(small_synthetic, tmp_path):
    from vtprune.bench.accuracy import run

    rows = run(small_synthetic, n=6, methods=[("random", {}), ("kcenter", {}), ("fastv", {})], budgets=(64,),
               random_seeds=2, batch_size=6, out_dir=tmp_path, plot=False, progress=False)
    by = {r["method"]: r for r in rows}
    assert by["kcenter"]["kept"] == 64 and by["random"]["kept"] == 64
    assert by["fastv"]["mean_per_layer"] == pytest.approx((2 * 576 + 64) / 3)  # layers 0-1 see every token
    for r in rows:
        assert 0 <= r["accuracy"] <= 1
        if by["none"]["accuracy"]:
            assert r["retention"] == pytest.approx(r["accuracy"] / by["none"]["accuracy"])
    assert torch.isfinite(torch.tensor([r["accuracy"] for r in rows])).all()


def test_accuracy_report_compares_each_method_with_random_at_its_stage(capsys):
    from vtprune.bench.accuracy import _print

    def row(method, acc, kept=64, per_layer=64.0):
        return {"method": method, "budget": 64, "kept": kept, "mean_per_layer": per_layer, "accuracy": acc,
                "retention": acc}

    rows = [{**row("none", 1.0, 576, 576.0)}, row("random", 0.5), row("random(layer=2)", 0.8, per_layer=405.3),
            row("kcenter", 0.6), row("pool", 0.4), row("fastv", 0.7, per_layer=405.3),
            row("entropy", 0.9, per_layer=405.3)]
    _print(rows, n=10, elapsed=1.0)
    flagged = capsys.readouterr().out.splitlines()[-1]
    # pool loses to input-stage random; fastv beats input random but loses to random at its own layer
    assert flagged.endswith("pool@64 (< random), fastv@64 (< random(layer=2))"), flagged


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prefill_clock_times_the_vision_tower_that_generate_runs_first(family):
    # transformers 5 generate() encodes the image before its first forward: a clock on the forward alone
    # would miss the 60 ms this vision tower is made to sleep.
    import time

    from vtprune.bench.timing import PrefillClock, vision_tower
    from vtprune.testing import tiny

    model = tiny.build(family).eval()
    inputs = tiny.make_inputs(model, [tiny.Row(), tiny.Row(seed=1)])
    sleep = vision_tower(model).register_forward_hook(lambda *_: time.sleep(0.06))
    stops: list[tuple[float, int]] = []
    clock = PrefillClock(model, on_start=lambda: "started",
                         on_stop=lambda ms, kw, s: stops.append((ms, kw["input_ids"].shape[0], s)))
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        clock.remove()
        sleep.remove()
    assert len(stops) == 1  # the prefill only, not the 2 decode steps
    ms, rows, started = stops[0]
    assert ms >= 60 and clock.ms == ms and rows == 2 and started == "started"


def test_paired_e_recovers_a_planted_overhead_without_scaling_layer_noise():
    """In-LLM pruning (2 of 4 proxy layers at the full count, the rest at the kept one; real depth 32): the
    pruned run costs 3 ms more than its ideal, and its kept-count layers run +-0.1 ms off the ideal run's from
    one repetition to the next. E must be ideal / (ideal + 3) with a CI under 1%: the layer jitter enters once
    per proxy layer (+-0.2 ms), not once per real layer (+-3 ms, a ~4% CI, what scaling both runs gave)."""
    from types import SimpleNamespace

    from vtprune.bench.speed import Bench, Result, Run, paired_e

    bench = Bench.__new__(Bench)
    bench.n_visual, bench.n_text = 576, 10
    bench.proxy = SimpleNamespace(vision_layers=0, text_layers=32, proxy_text_layers=4)
    full, kept = 586, 74

    def run(layers: list[float], tokens: list[int], other: float) -> Run:
        return Run(total=other + sum(layers), llm=layers, llm_tokens=tokens, vit=[], head=0.0)

    base = Result("p", "none", "none", 576, 576, [576] * 32)
    base.raw = [run([10.0] * 4, [full] * 4, 5.0) for _ in range(3)]
    base.direct = [[run([10.0] * 4, [full] * 4, 5.0)] for _ in range(3)]
    pruned = Result("p", "fastv", "fastv", 64, 64, [576] * 2 + [64] * 30)
    for jitter in (0.0, 0.1, -0.1):
        t = 2.0 + jitter
        pruned.raw.append(run([10.0, 10.0, t, t], [full, full, kept, kept], 5.0 + 3.0))
        pruned.direct.append([run([2.0] * 4, [kept] * 4, 5.0)])
    e, ci = paired_e(pruned, bench, base)
    ideal = 5.0 + 2 * 10.0 + 30 * 2.0
    assert e == pytest.approx(ideal / (ideal + 3.0), rel=1e-3) and ci < 0.01
    assert paired_e(base, bench, base) == pytest.approx((1.0, 0.0))  # the control


def test_every_method_has_its_own_colour_and_marker():
    """Plots tell methods apart by (colour, marker): no two registered methods share the pair, nor do variants
    and unknown labels beside them; a method looks the same in every plot; random is black and thicker."""
    from vtprune.bench.accuracy import ACC_METHODS, _label
    from vtprune.bench.speed import BENCH_METHODS
    from vtprune.bench.style import MARKERS, PALETTE, method_styles
    from vtprune.registry import METHODS

    def pairs(styles):
        return [(s["color"], s["marker"]) for s in styles.values()]

    names = METHODS.names()
    everything = method_styles(names)
    assert len(set(pairs(everything))) == len(names)
    for table in (ACC_METHODS, BENCH_METHODS):
        labels = ["none"] + [_label(n, o) for n, o in table] + ["fastv:layer=3", "my_plugin_method", "other"]
        styles = method_styles(labels)
        assert len(set(pairs(styles))) == len(labels)
        for name in names:  # a registered method keeps its look whatever else is plotted
            if name in styles:
                assert styles[name] == everything[name], name
    assert everything["random"]["color"] == "#000000"
    assert everything["random"]["linewidth"] > max(s["linewidth"] for n, s in everything.items() if n != "random")
    assert method_styles(["none"])["none"]["linestyle"] == "--"
    # the only configuration of a method in a plot takes the method's own look; a second one is dash-dotted
    alone = method_styles(["entropy(budget_mode=direct)", "kcenter", "kcenter(variant=todre)"])
    assert alone["entropy(budget_mode=direct)"] == everything["entropy"]
    assert alone["kcenter(variant=todre)"]["color"] == everything["kcenter"]["color"]
    assert alone["kcenter(variant=todre)"]["linestyle"] == "-."
    # with a registry as large as the palette times the markers, still no repeats
    many = [f"m{i}" for i in range(len(PALETTE) * len(MARKERS))]
    assert len(set(pairs(method_styles(many, registered=many)))) == len(many)


def _fake_rows(methods, budgets=(192, 64)):
    rows = [{"method": "none", "budget": 576, "kept": 576, "per_layer": 576.0, "mean_per_layer": 576.0,
             "accuracy": 0.8, "retention": 1.0, "prefill_ms": 100.0, "speedup": 1.0, "efficiency": 1.0,
             "select_ms": 0.0}]
    for i, m in enumerate(methods):
        for b in budgets:
            acc = 0.8 - 0.01 * i - 0.1 * (b < 100)
            rows.append({"method": m, "budget": b, "kept": b, "per_layer": b + 5.0 * i, "mean_per_layer": b + 5.0 * i,
                         "accuracy": acc, "retention": acc / 0.8, "prefill_ms": 20.0 + b / 10, "speedup": 576 / b,
                         "efficiency": 0.97, "select_ms": 0.5})
    return rows


def test_plots_are_written_with_a_legend_below(tmp_path):
    """The demo's two panels, accuracy.png and a bench figure, on fake rows with every accuracy method: each PNG
    is written, and the legend (outside the axes) makes the canvas taller than the figure size."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from PIL import Image

    from vtprune.bench.accuracy import ACC_METHODS, _label, _plot
    from vtprune.bench.demo import _report
    from vtprune.bench.report import plot_rows

    methods = [_label(n, o) for n, o in ACC_METHODS]
    rows = _fake_rows(methods)
    _report(rows, n=10, reps=1, t_vis=5.0, elapsed=1.0, out=tmp_path, plot=True)
    _plot(rows, tmp_path / "accuracy.png", 0.8)
    bench = [{"proxy": "tiny", "kept": r["kept"], "method": r["method"], "speedup_scaled": r["speedup"],
              "kv_bytes_scaled": r["kept"] * 2**16, "peak_mb": 100.0 + r["kept"]} for r in rows]
    plot_rows(bench, tmp_path)
    for name, (w_in, h_in, dpi) in {"demo.png": (12, 4.5, 130), "accuracy.png": (8, 4.5, 130),
                                    "bench_tiny.png": (16, 4, 120)}.items():
        with Image.open(tmp_path / name) as im:
            w, h = im.size
            assert h > h_in * dpi * 1.1, (name, im.size)  # the legend rows under the axes
            assert w <= w_in * dpi * 1.1, (name, im.size)  # ... not a legend sticking out sideways
            assert len(im.convert("RGB").getcolors(1 << 20)) > 30
