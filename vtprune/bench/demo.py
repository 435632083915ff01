"""``vtprune demo``: every method x ratio on the embedded default model; prefill time, speed-up and the
efficiency E = (prefill of the same model fed only the kept tokens) / (pruned prefill).

The embedded model is, until the trained synthetic VLM exists (issue 6), a random-weight LLaVA with the
real LLaVA-1.5 geometry (336 px, patch 14: 576 visual tokens) and a small Llama (8 layers, width 512),
so that the LLM dominates prefill as it does at 7B. Random weights mean no accuracy is reported here.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import vtprune
from vtprune.bench.timing import Timing, time_interleaved
from vtprune.testing.tiny import BOS, IMAGE, demo_llava

DEMO_METHODS: list[tuple[str, dict]] = [
    ("random", {}),
    ("pool", {}),
    ("kcenter", {}),
    ("cls_attention", {}),
    ("fastv", {"layer": 2}),
]
DEMO_RATIOS = (0.5, 0.75, 0.889)


@dataclass
class Row:
    method: str
    ratio: float
    kept: int
    prefill: Timing
    speedup: float
    efficiency: float
    select_ms: float


def demo_inputs(model: torch.nn.Module, system: int = 35, question: int = 12, seed: int = 0) -> dict:
    """A LLaVA-1.5-shaped prompt: 35 system tokens, the image (576 tokens), a 12-token question."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.config.image_seq_length
    text = torch.randint(3, 400, (system + question,), generator=g).tolist()
    ids = torch.tensor([[BOS] + text[:system] + [IMAGE] * n_img + text[system:]])
    px = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, px, px, generator=g)}


@torch.no_grad()
def run(reps: int = 5, out_dir: str | Path = "out", methods: list[tuple[str, dict]] | None = None,
        ratios: tuple[float, ...] = DEMO_RATIOS, plot: bool = True) -> list[Row]:
    torch.manual_seed(0)
    model = demo_llava()
    inputs = demo_inputs(model)
    methods = methods or DEMO_METHODS
    lm_layers = model.config.text_config.num_hidden_layers
    embed = model.get_input_embeddings()

    def prefill(**kw) -> None:
        model(**kw, use_cache=True, logits_to_keep=1)

    # Pieces of the "direct" run: the vision tower + projector, and the LLM fed K visual tokens.
    feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]  # (576, D)
    ids = inputs["input_ids"][0]
    is_img = ids == IMAGE
    text_before = embed(ids[: int(is_img.nonzero()[0])])
    text_after = embed(ids[int(is_img.nonzero()[-1]) + 1 :])

    def direct_embeds(k: int) -> torch.Tensor:
        return torch.cat([text_before, feats[:k], text_after])[None]  # which k tokens does not matter for time

    fns = {"baseline": lambda: prefill(**inputs),
           "vision": lambda: model.model.get_image_features(inputs["pixel_values"])}
    contexts, stats_of, kept_of = {}, {}, {}
    for name, kw in methods:
        for r in ratios:
            key = f"{name}@{r}"
            # pruning is installed outside the timed region; the timed call is the prefill alone
            contexts[key] = lambda name=name, kw=kw, r=r: vtprune.prune(model, name, ratio=r, **kw)
            fns[key] = lambda: prefill(**inputs)
            with contexts[key]() as h:  # one untimed pass to learn the kept counts
                prefill(**inputs)
                stats_of[(name, r)] = h.stats
                kept_of[(name, r)] = h.stats.visual_after[0]
    n_img = int(is_img.sum())
    for k in sorted({*kept_of.values(), n_img}):
        e = direct_embeds(k)
        fns[f"lm@{k}"] = lambda e=e: model(inputs_embeds=e, use_cache=True, logits_to_keep=1)
    times = time_interleaved(fns, reps=reps, warmup=1, progress=True, contexts=contexts)

    t_base = times["baseline"].median_ms
    t_vis = times["vision"].median_ms
    rows = []
    for name, kw in methods:
        for r in ratios:
            t = times[f"{name}@{r}"]
            k = kept_of[(name, r)]
            if "layer" in kw:  # in-LLM: layers < K see all tokens; the ideal is layer-proportional
                K = kw["layer"]
                full, kept = times[f"lm@{n_img}"].median_ms, times[f"lm@{k}"].median_ms
                ideal = t_vis + K / lm_layers * full + (1 - K / lm_layers) * kept
            else:
                ideal = t_vis + times[f"lm@{k}"].median_ms
            stats = stats_of[(name, r)]
            rows.append(Row(name, r, k, t, t_base / t.median_ms, ideal / t.median_ms, stats.select_ms))
    _report(rows, times, t_base, n_img, reps, out_dir, plot)
    return rows


def _report(rows: list[Row], times: dict[str, Timing], t_base: float, n_img: int, reps: int,
            out_dir: str | Path, plot: bool) -> None:
    threads = torch.get_num_threads()
    print(f"\nvtprune demo: random-weight LLaVA-1.5 geometry ({n_img} visual tokens), 8-layer width-512 Llama, "
          f"sdpa, CPU, {threads} thread(s), median of {reps} interleaved reps")
    print(f"unpruned prefill: {times['baseline']}  (vision tower + projector: {times['vision']})\n")
    head = f"{'method':<15}{'ratio':>7}{'kept':>6}{'prefill ms':>12}{'speed-up':>10}{'efficiency':>12}{'select ms':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.method:<15}{r.ratio:>7.3f}{r.kept:>6}{r.prefill.median_ms:>12.1f}{r.speedup:>9.2f}x"
              f"{r.efficiency:>12.2f}{r.select_ms:>11.2f}")
    print("\nefficiency = prefill of the same model fed only the kept tokens / pruned prefill (1.00 = pruning costs "
          "nothing beyond its savings; fastv's ideal runs layers < K on all tokens).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "demo.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "ratio", "kept", "prefill_ms", "prefill_min_ms", "prefill_max_ms", "speedup",
                    "efficiency", "select_ms", "baseline_ms"])
        for r in rows:
            w.writerow([r.method, r.ratio, r.kept, f"{r.prefill.median_ms:.2f}", f"{r.prefill.min_ms:.2f}",
                        f"{r.prefill.max_ms:.2f}", f"{r.speedup:.3f}", f"{r.efficiency:.3f}", f"{r.select_ms:.3f}",
                        f"{t_base:.2f}"])
    print(f"wrote {out / 'demo.csv'}")
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r.method for r in rows):
            pts = sorted((r.kept, r.speedup) for r in rows if r.method == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel(f"visual tokens kept (of {n_img})")
        ax.set_ylabel("prefill speed-up")
        ax.set_title("vtprune demo (random-weight LLaVA geometry, CPU)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "demo_speedup.png", dpi=120)
        print(f"wrote {out / 'demo_speedup.png'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run()
