"""``vtprune demo`` (``make demo``): every method at 192 / 128 / 64 visual tokens on the embedded default model,
the LLaVA-1.5-architecture VLM trained here on synthetic VQA (``models/synthetic-llava``, issue 6).

For each method x budget it reports held-out accuracy and its retention (% of the unpruned model), the
visual tokens the decoder layers see, the prefill time of one prompt (median of interleaved repetitions),
the speed-up over the unpruned prefill, the efficiency E and the selection time.

E = (prefill of the same model fed only the kept tokens, no pruner: its vision tower still encodes the
image, its LLM sees the method's mean visual tokens per layer) / (pruned prefill); 1.0 means pruning costs
nothing beyond what it saves. The trained model is small (its ViT is a large share of the prefill), so
its speed-ups understate a 7B model's: ``vtprune bench`` measures those on width-faithful proxies.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import vtprune
from vtprune.bench.accuracy import ACC_METHODS, DEFAULT_MODEL, _label, load, method_variants
from vtprune.bench.timing import time_interleaved

DEMO_BUDGETS = (192, 128, 64)


@torch.no_grad()
def run(model_dir: str | Path = DEFAULT_MODEL, n: int = 100, budgets: tuple[int, ...] = DEMO_BUDGETS,
        methods: list[tuple[str, dict]] | None = None, reps: int = 3, batch_size: int = 50,
        out_dir: str | Path = "out", plot: bool = True, progress: bool = True) -> list[dict]:
    from vtprune.synthetic.eval import evaluate
    from vtprune.synthetic.scenes import heldout
    from vtprune.synthetic.tokenizer import prompt

    t_start = time.perf_counter()
    model, processor = load(model_dir)
    methods = methods if methods is not None else ACC_METHODS
    samples = heldout(n)
    one = dict(processor(images=[samples[0].image], text=[prompt(samples[0].question)], return_tensors="pt"))

    def prefill(**kw: Any) -> None:
        model(**kw, use_cache=True, logits_to_keep=1)

    # --- accuracy (every batch through generate(), as a user runs it) and the kept counts
    base = evaluate(model, processor, samples, batch_size=batch_size)
    cache: dict[str, Any] = {}
    cells: list[dict] = []
    configs = [(name, opts, b) for name, opts in methods for b in budgets]
    it = configs
    if progress:
        from tqdm import tqdm

        it = tqdm(configs, desc="demo: accuracy")
    for name, options, budget in it:
        variants = method_variants(model, processor, name, options, random_seeds=1, cache=cache)
        method = variants[0]
        with vtprune.prune(model, method, keep=budget) as h:
            acc = evaluate(model, processor, samples, batch_size=batch_size).accuracy
            prefill(**one)  # the timed prompt's own counts
            kept, per_layer = h.stats.visual_after[0], h.stats.mean_visual_per_layer[0]
        cells.append({"method": _label(name, options), "budget": budget, "kept": kept, "per_layer": per_layer,
                      "accuracy": acc, "retention": acc / base.accuracy if base.accuracy else float("nan"),
                      "_method": method})

    # --- speed: one prompt, batch 1, all configurations interleaved; pruning installed outside the timing
    ids = one["input_ids"][0]
    is_img = ids == model.config.image_token_id
    n_img = int(is_img.sum())
    feats = model.model.get_image_features(one["pixel_values"]).pooler_output[0]  # (576, D)
    embed = model.get_input_embeddings()
    first, last = int(is_img.nonzero()[0]), int(is_img.nonzero()[-1])
    before, after = embed(ids[:first]), embed(ids[last + 1:])

    def llm_with(k: int) -> torch.Tensor:  # which k tokens does not matter for time
        return torch.cat([before, feats[:k], after])[None]

    fns: dict[str, Any] = {"unpruned": lambda: prefill(**one),
                           "vision": lambda: model.model.get_image_features(one["pixel_values"])}
    contexts = {}
    for c in cells:
        key = f"{c['method']}@{c['budget']}"
        contexts[key] = lambda c=c: vtprune.prune(model, c["_method"], keep=c["budget"])
        fns[key] = lambda: prefill(**one)
    for k in sorted({n_img, *(c["kept"] for c in cells)}):
        e = llm_with(k)
        fns[f"llm@{k}"] = lambda e=e: model(inputs_embeds=e, use_cache=True, logits_to_keep=1)
    times = time_interleaved(fns, reps=reps, warmup=1, progress=progress, contexts=contexts)
    t_base, t_vis = times["unpruned"].median_ms, times["vision"].median_ms
    t_full = times[f"llm@{n_img}"].median_ms
    select_ms: dict[str, float] = {}
    for c in cells:  # selection time: one more untimed-by-the-above pass per configuration
        with vtprune.prune(model, c["_method"], keep=c["budget"]) as h:
            ms = []
            for _ in range(3):
                prefill(**one)
                ms.append(h.stats.select_ms)
        select_ms[f"{c['method']}@{c['budget']}"] = statistics.median(ms)
    for c in cells:
        key = f"{c['method']}@{c['budget']}"
        t = times[key].median_ms
        t_kept = times[f"llm@{c['kept']}"].median_ms
        # the ideal LLM time at the method's mean tokens per layer (linear between the measured counts)
        frac = (c["per_layer"] - c["kept"]) / max(n_img - c["kept"], 1)
        ideal = t_vis + t_kept + frac * (t_full - t_kept)
        c.update(prefill_ms=t, speedup=t_base / t, efficiency=ideal / t, select_ms=select_ms[key])
    rows = [{"method": "none", "budget": n_img, "kept": n_img, "per_layer": float(n_img),
             "accuracy": base.accuracy, "retention": 1.0, "prefill_ms": t_base, "speedup": 1.0,
             "efficiency": 1.0, "select_ms": 0.0}]
    rows += [{k: v for k, v in c.items() if not k.startswith("_")} for c in cells]
    if plot:  # what survives: the kept tokens of a few methods on one held-out question (vtprune show)
        _show(model, processor, Path(out_dir))
    _report(rows, n, reps, t_vis, time.perf_counter() - t_start, Path(out_dir), plot)
    return rows


SHOW_METHODS = ("random", "kcenter", "cls_attention", "vispruner", "cdpruner", "visionzip", "vscan", "fastv",
                "pdrop:budget_mode=last", "sparsevlm:raters=all", "dart")
SHOW_SAMPLE = 3  # a held-out counting question ("how many purple shapes"): two objects matter


def _show(model: torch.nn.Module, processor: Any, out: Path, keep: int = 64) -> None:
    from vtprune.show import figure, run as show
    from vtprune.synthetic.scenes import heldout

    sample = heldout(1, offset=SHOW_SAMPLE)[0]
    entries = show(model, processor, sample.image, sample.question, SHOW_METHODS, keep=keep)
    path = figure([sample.image], entries, vtprune.adapter_for(model), out / "show.png", processor=processor,
                  title=f"{sample.question!r} (truth: {sample.answer!r}), {keep} visual tokens kept of 576", dpi=90)
    print(f"wrote {path}")


def _report(rows: list[dict], n: int, reps: int, t_vis: float, elapsed: float, out: Path, plot: bool) -> None:
    base = rows[0]
    print(f"\nvtprune demo: models/synthetic-llava (LLaVA-1.5 architecture, 576 visual tokens), {n} held-out "
          f"synthetic VQA questions; prefill of one prompt, CPU, {torch.get_num_threads()} thread(s), median of "
          f"{reps} interleaved reps")
    print(f"unpruned: accuracy {base['accuracy']:.3f}, prefill {base['prefill_ms']:.1f} ms "
          f"(vision tower + projector {t_vis:.1f} ms)\n")
    head = (f"{'method':<26}{'keep':>5}{'kept':>6}{'/layer':>8}{'accuracy':>10}{'retained':>10}{'prefill ms':>12}"
            f"{'speed-up':>10}{'E':>7}{'select ms':>11}")
    print(head)
    print("-" * len(head))
    for r in rows[1:]:
        print(f"{r['method'][:25]:<26}{r['budget']:>5}{r['kept']:>6}{r['per_layer']:>8.1f}{r['accuracy']:>10.3f}"
              f"{100 * r['retention']:>9.1f}%{r['prefill_ms']:>12.1f}{r['speedup']:>9.2f}x{r['efficiency']:>7.2f}"
              f"{r['select_ms']:>11.2f}")
    print("\nkept = visual tokens after the last stage; /layer = mean visual tokens per decoder layer (in-LLM methods "
          "see all 576 before their layer). E = ideal / pruned prefill (1.00: pruning costs nothing beyond its "
          f"savings). Total {elapsed:.0f} s.")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "demo.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {out / 'demo.csv'}")
    if not plot:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    from vtprune.bench.style import legend_below, method_styles

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    styles = method_styles(methods)
    for method in methods:
        pts = sorted((r["per_layer"], r["retention"] * 100, r["speedup"]) for r in rows if r["method"] == method)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=method, **styles[method])
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], label=method, **styles[method])
    axes[0].axhline(100, color="grey", ls="--", lw=0.8)
    axes[0].set(xlabel="visual tokens per decoder layer (mean; 576 unpruned)", ylabel="accuracy retained (%)",
                title=f"synthetic VQA ({n} held-out), unpruned {base['accuracy']:.3f}")
    axes[1].axhline(1, color="grey", ls="--", lw=0.8)
    axes[1].set(xlabel="visual tokens per decoder layer (mean; 576 unpruned)", ylabel="prefill speed-up",
                title="prefill of one prompt (CPU)")
    fig.tight_layout()
    legend_below(fig)  # one legend for both panels, under them
    fig.savefig(out / "demo.png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out / 'demo.png'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run()
