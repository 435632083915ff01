"""``vtprune accuracy``: accuracy of every method x budget on the offline synthetic VQA benchmark, with the
VLM trained here (``models/synthetic-llava``), as % of the unpruned model, and a plot vs kept tokens.

Held-out samples never overlap the training split; ``debiased_attention`` is calibrated on training-split
samples. ``random`` is averaged over several seeds (its spread is reported). Budgets are nominal keep=
values; the table also reports the visual tokens actually kept after the last stage and their average
over decoder layers (in-LLM methods keep every token in the layers before K, FastV-style).

In-LLM methods run at their papers' layers (FastV, DART, debiasing: K = 2; TransPrune's schedule scaled to
the depth). EntropyPrune runs with ``budget_mode="direct"`` (keep= tokens after its layer): its paper budget
is an average over all layers, which on the 4-layer synthetic model cannot go below 2 x 576 / 4 tokens per layer.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import vtprune

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "synthetic-llava"
ACC_METHODS: list[tuple[str, dict]] = [
    ("random", {}), ("pool", {}), ("cls_attention", {}), ("kcenter", {}), ("kcenter", {"variant": "todre"}),
    ("mmr", {}), ("coverage", {}), ("zeroth_order", {}), ("visionzip", {}), ("fastv", {}),
    ("entropy", {"budget_mode": "direct"}), ("dart", {}), ("transition", {}), ("debiased_attention", {}),
    ("vispruner", {}), ("hiprune", {}), ("holov", {}), ("cdpruner", {}), ("vscan", {}), ("sparsevlm", {}),
    ("pdrop", {"budget_mode": "last"}),
    ("random", {"layer": 2}),  # the chance reference for in-LLM methods: layers < 2 see every token
]
ACC_BUDGETS = (192, 128, 64, 32, 16)


def load(model_dir: str | Path = DEFAULT_MODEL) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    return model, processor


def method_variants(model: torch.nn.Module, processor: Any, name: str, options: dict, random_seeds: int = 3,
                    cache: dict[str, Any] | None = None) -> list[Any]:
    """The method objects one accuracy cell averages over: ``random`` once per seed; ``debiased_attention``
    with its trend fitted (once, cached in ``cache``) on TRAINING-split scenes, never on the held-out set."""
    cache = {} if cache is None else cache
    if name == "random":
        return [vtprune.method("random", seed=s, **options) for s in range(random_seeds)]
    if name == "debiased_attention":
        if "debiased" not in cache:
            from vtprune.calibration import debiased_attention as calibrate
            from vtprune.synthetic.scenes import iter_samples
            from vtprune.synthetic.tokenizer import prompt

            cal = list(iter_samples("train", 0, 64))
            batches = [dict(processor(images=[s.image for s in cal[i:i + 16]],
                                      text=[prompt(s.question) for s in cal[i:i + 16]], padding=True,
                                      return_tensors="pt")) for i in range(0, len(cal), 16)]
            cache["debiased"] = calibrate(model, batches, host="fastv", **options)
        return [cache["debiased"]]
    return [vtprune.method(name, **options)]


def _label(name: str, options: dict) -> str:
    return name + ("" if not options else "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")")


def run(model_dir: str | Path = DEFAULT_MODEL, n: int = 500, methods: list[tuple[str, dict]] | None = None,
        budgets: tuple[int, ...] = ACC_BUDGETS, random_seeds: int = 3, batch_size: int = 32,
        out_dir: str | Path = "out", plot: bool = True, progress: bool = True, host: str = "hf") -> list[dict]:
    """The table on ``host``: "hf" (transformers, every method) or "vllm" (the vLLM plugin, its methods; one
    engine per configuration; needs the vLLM environment)."""
    if host == "vllm":
        return _run_vllm(model_dir, n, methods if methods is not None else ACC_METHODS, budgets, random_seeds,
                         out_dir, plot)
    if host != "hf":
        raise ValueError(f"host={host!r}; allowed: 'hf', 'vllm'")
    from vtprune.synthetic.eval import evaluate
    from vtprune.synthetic.scenes import heldout

    model, processor = load(model_dir)
    samples = heldout(n)
    methods = methods if methods is not None else ACC_METHODS
    t0 = time.perf_counter()
    base = evaluate(model, processor, samples, batch_size=batch_size)
    rows = [{"method": "none", "budget": 576, "kept": 576.0, "mean_per_layer": 576.0, "accuracy": base.accuracy,
             "retention": 1.0, "spread": 0.0, **{f"acc_{k}": v for k, v in base.per_type.items()}}]
    configs = [(name, opts, b) for name, opts in methods for b in budgets]
    it = configs
    if progress:
        from tqdm import tqdm

        it = tqdm(configs, desc="accuracy")
    cache: dict[str, Any] = {}
    for name, options, budget in it:
        method_objs = method_variants(model, processor, name, options, random_seeds, cache)
        accs, per_type, kept, per_layer = [], {}, [], []
        for m in method_objs:
            with vtprune.prune(model, m, keep=budget) as h:
                res = evaluate(model, processor, samples, batch_size=batch_size)
                kept.append(statistics.mean(h.stats.visual_after))
                per_layer.append(statistics.mean(h.stats.mean_visual_per_layer))
            accs.append(res.accuracy)
            for k, v in res.per_type.items():
                per_type.setdefault(k, []).append(v)
        acc = statistics.mean(accs)
        rows.append({"method": _label(name, options), "budget": budget, "kept": statistics.mean(kept),
                     "mean_per_layer": statistics.mean(per_layer), "accuracy": acc,
                     "retention": acc / base.accuracy if base.accuracy else float("nan"),
                     "spread": (max(accs) - min(accs)) if len(accs) > 1 else 0.0,
                     **{f"acc_{k}": statistics.mean(v) for k, v in per_type.items()}})
    elapsed = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(rows, out / "accuracy.csv")
    _print(rows, n, elapsed)
    if plot:
        _plot(rows, out / "accuracy.png", base.accuracy)
    return rows


def _run_vllm(model_dir: str | Path, n: int, methods: list[tuple[str, dict]], budgets: tuple[int, ...],
              random_seeds: int, out_dir: str | Path, plot: bool) -> list[dict]:
    from transformers import AutoTokenizer

    from vtprune.integrations.vllm.accuracy import cells
    from vtprune.synthetic.scenes import heldout

    t0 = time.perf_counter()
    samples = heldout(n)
    configs = [(name, opts, b) for name, opts in methods for b in budgets]
    base, cells_, skipped = cells(model_dir, samples, configs, random_seeds, AutoTokenizer.from_pretrained(model_dir))
    rows = [{"method": "none", "budget": 576, "kept": 576.0, "mean_per_layer": 576.0, "accuracy": base["accuracy"],
             "retention": 1.0, "spread": 0.0, **{f"acc_{k}": v for k, v in base["per_type"].items()}}]
    for c in cells_:
        acc = statistics.mean(c["accs"])
        rows.append({"method": _label(c["name"], c["options"]), "budget": c["budget"], "kept": c["kept"],
                     "mean_per_layer": c["kept"], "accuracy": acc,
                     "retention": acc / base["accuracy"] if base["accuracy"] else float("nan"),
                     "spread": (max(c["accs"]) - min(c["accs"])) if len(c["accs"]) > 1 else 0.0,
                     **{f"acc_{k}": statistics.mean(p[k] for p in c["per"]) for k in c["per"][0]}})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(rows, out / "accuracy_vllm.csv")
    _print(rows, n, time.perf_counter() - t0)
    for note in skipped:
        print(f"skipped (vLLM host): {note}")
    if plot:
        _plot(rows, out / "accuracy_vllm.png", base["accuracy"])
    return rows


def _write(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {path}")


def _print(rows: list[dict], n: int, elapsed: float) -> None:
    budgets = sorted({r["budget"] for r in rows if r["method"] != "none"}, reverse=True)
    base = rows[0]["accuracy"]
    print(f"\nsynthetic VQA, {n} held-out questions, unpruned accuracy {base:.3f} ({elapsed:.0f} s)")
    print(f"{'method':<28}" + "".join(f"{b:>14}" for b in budgets) + "   (accuracy, % of unpruned)")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["method"] == method and r["budget"] == b), None)
            cells.append(f"{r['accuracy']:.3f} {100 * r['retention']:4.0f}%" if r else "")
        print(f"{method[:27]:<28}" + "".join(f"{c:>14}" for c in cells))
    # Each method against random pruning at its own stage: an in-LLM method (its layers before K see every
    # token, so it processes more tokens per layer than it keeps) against random(layer=2), if that was run.
    rnd = {(r["method"], r["budget"]): r["accuracy"] for r in rows if r["method"].startswith("random")}
    losers = []
    for r in rows:
        if r["method"] == "none" or r["method"].startswith("random") or r["budget"] > 64:
            continue
        ref = _label("random", {"layer": 2}) if r["mean_per_layer"] > r["kept"] + 0.5 else "random"
        if (ref, r["budget"]) in rnd and r["accuracy"] < rnd[ref, r["budget"]]:
            losers.append(f"{r['method']}@{r['budget']} (< {ref})")
    print("informed methods below random at <= 64 tokens: " + (", ".join(losers) or "none"))


def _plot(rows: list[dict], path: Path, base: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from vtprune.bench.style import legend_below, method_styles

    fig, ax = plt.subplots(figsize=(8, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    styles = method_styles(methods)
    for method in methods:
        pts = sorted((r["mean_per_layer"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **styles[method])
    ax.axhline(base, color="grey", ls="--", lw=0.8, label="unpruned")
    ax.set_xscale("log")
    ax.set(xlabel="visual tokens per decoder layer (mean; 576 unpruned)", ylabel="held-out accuracy",
           title="synthetic VQA: accuracy vs kept visual tokens")
    fig.tight_layout()
    legend_below(fig)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
