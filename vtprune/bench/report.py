"""Printing and plotting ``vtprune bench`` results."""

from __future__ import annotations

from pathlib import Path

from vtprune.registry import METHODS


def print_rows(rows: list[dict]) -> None:
    """The bench table, the raw / scaled legend, the control and the E targets."""
    head = (f"{'proxy':<14}{'method':<28}{'keep':>5}{'kept':>6}{'raw ms':>9}{'x raw':>7}{'scaled ms':>11}"
            f"{'x scaled':>9}{'E scaled':>16}{'E parts':>8}{'sel ms':>8}{'sel %':>7}{'KV/ideal':>9}{'reps':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        e = f"{r['E_scaled']:.3f}+-{r['E_ci'] * r['E_scaled']:.3f}"
        print(f"{r['proxy']:<14}{r['method'][:27]:<28}{r['budget']:>5}{r['kept']:>6}{r['prefill_raw_ms']:>9.1f}"
              f"{r['speedup_raw']:>7.2f}{r['prefill_scaled_ms']:>11.1f}{r['speedup_scaled']:>9.2f}{e:>16}"
              f"{r['E_parts']:>8.3f}{r['select_ms']:>8.1f}{r['select_pct']:>7.2f}{r['kv_vs_ideal']:>9.2f}{r['reps']:>5}")
    print("\nraw = the proxy as built (few layers); scaled = its layers replaced by the real depth's schedule.")
    print("E = ideal / pruned prefill, paired per repetition, geometric mean +- 95% CI; E parts = ideal / (ideal + "
          "time inside vtprune's hooks). Control: the unpruned model against itself (method 'none'), its CI the "
          "resolution of the paired E.")
    for r in rows:
        if r["method"] == "none":
            print(f"  control {r['proxy']:<14} E={r['E_scaled']:.4f} +-{100 * r['E_ci']:.2f}% over {r['reps']} reps")
    print("targets: E >= 0.97 for vision/input methods at 64 tokens (0.90 zeroth_order), >= 0.90 in-LLM;"
          " KV/ideal >= 0.95 (ok: E >= target; MISS: the whole CI below; ?: the CI straddles it)")
    for r in rows:
        if r["method"] == "none" or r["budget"] != 64:
            continue
        m = METHODS.get(r["method"].split("(")[0])
        target = 0.90 if (m.stage == "layer" or r["method"].startswith("zeroth")) else 0.97
        hi = r["E_scaled"] * (1 + r["E_ci"])
        ok = "ok " if r["E_scaled"] >= target else ("MISS" if hi < target else "?   ")
        print(f"  {ok} {r['proxy']:<14}{r['method']:<28} E={r['E_scaled']:.3f} +-{r['E_ci'] * r['E_scaled']:.3f}"
              f" (target {target})")


def plot_rows(rows: list[dict], out: Path) -> None:
    """Speed-up, KV cache and peak memory against the kept tokens, one figure per proxy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from vtprune.bench.style import legend_below, method_styles

    for proxy in dict.fromkeys(r["proxy"] for r in rows):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        methods = list(dict.fromkeys(r["method"] for r in rows if r["proxy"] == proxy and r["method"] != "none"))
        styles = method_styles(methods)
        for method in methods:
            pts = sorted((r["kept"], r["speedup_scaled"], r["kv_bytes_scaled"] / 2**20, r["peak_mb"]) for r in rows
                         if r["proxy"] == proxy and r["method"] == method)
            for i in range(3):
                axes[i].plot([p[0] for p in pts], [p[i + 1] for p in pts], label=method, **styles[method])
        base = next(r for r in rows if r["proxy"] == proxy and r["method"] == "none")
        axes[2].axhline(base["peak_mb"], color="grey", linestyle="--", label="unpruned")
        axes[0].set(xlabel="visual tokens kept (last stage)", ylabel="prefill speed-up (scaled to real depth)",
                    title=f"{proxy}")
        axes[1].set(xlabel="visual tokens kept (last stage)", ylabel="KV cache (MB, real depth)", title=f"{proxy}")
        axes[2].set(xlabel="visual tokens kept (last stage)", ylabel="peak memory in prefill (MB, the proxy)",
                    title=f"{proxy}")
        fig.tight_layout()
        legend_below(fig)
        fig.savefig(out / f"bench_{proxy}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {out / f'bench_{proxy}.png'}")
