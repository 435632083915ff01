"""``vtprune report OUT_DIR``: one self-contained HTML page of an evaluation's output directory.

    vtprune report out/eval                          # writes out/eval/report.html
    vtprune report out/eval --out /tmp/eval.html --max-samples 200
    vtprune report out/video_qa                      # every video-qa run directory under it, side by side

What it reads:

* a ``vtprune eval`` directory (vtprune/eval_runner.py): ``results.csv`` (the table and the plots),
  ``results.json`` (model and settings), ``samples.jsonl`` (per document and setting: question, target,
  response, the task's metrics, visual tokens; ``overlay``: an optional PNG of the kept tokens, relative to
  OUT_DIR);
* a ``vtprune video-qa`` directory (``predictions.jsonl`` + ``summary.json``), or a folder of several;
* a ``vtprune demo`` / ``vtprune accuracy`` directory (``demo.csv``, ``accuracy*.csv`` and their PNGs);
* a folder of eval directories: one section each.

The page holds a header with the run's settings, the results table, plots of score and prefill time against
the visual tokens kept (one line per method, the styles of vtprune.bench.style), every ``*.png`` already in
OUT_DIR, and per document the question, the target and each setting's answer, score, kept tokens and overlay.
Every image is a base64 data URI and nothing is fetched: the file opens from disk anywhere, offline. What is
missing (no overlays, no per-sample log, ...) is said on the page.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtprune.bench.style import legend_below, method_styles

DEFAULT_MAX_SAMPLES = 50
THUMB_PX = 320  # overlays are shrunk to this longest side: 50 documents x 10 settings must stay a few MB
_UNPRUNED = {"none", "baseline", "-"}


@dataclass
class Run:
    """One section of the page, in a shape every input kind is converted to."""

    kind: str  # "eval", "video-qa", "demo", "accuracy"
    root: Path
    title: str
    meta: list[tuple[str, str]] = field(default_factory=list)
    #: task, metric, method, budget, setting, score, stderr, pct_of_baseline, visual_kept, visual_before,
    #: mean_visual_per_layer, prefill_ms (floats or None)
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: task, doc_id, setting, method, question, target, response, metric, value, visual_after, visual_before,
    #: prefill_ms, overlay (an existing Path or None), overlay_missing (named but absent), has_overlay (named)
    samples: list[dict[str, Any]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plot_rows: bool = True  # make plots from ``rows`` (demo / accuracy directories bring their own)


# ============================================================================ reading
def _float(v: Any) -> float | None:
    if v is None or v == "" or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records and the count of lines that are not JSON (a run cut short leaves half a line)."""
    good, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            good.append(rec)
    return good, bad


def _pngs(root: Path, skip: Iterable[Path] = ()) -> list[Path]:
    skipped = {p.resolve() for p in skip}
    return [p for p in sorted(root.glob("*.png")) if p.resolve() not in skipped]


def load_eval(root: Path) -> Run:
    """A ``vtprune eval`` output directory."""
    spec: dict[str, Any] = {}
    run = Run("eval", root, f"vtprune eval: {root.name or root.resolve().name}")
    settings_order: list[str] = []
    if (root / "results.json").is_file():
        try:
            data = json.loads((root / "results.json").read_text())
            spec = data.get("spec") or {}
            settings_order = [s.get("setting") for s in data.get("settings") or [] if s.get("setting")]
            if data.get("wall_s") is not None:
                run.meta.append(("wall time", f"{float(data['wall_s']):.1f} s"))
        except (json.JSONDecodeError, ValueError, AttributeError) as exc:
            run.notes.append(f"results.json unreadable ({exc}): model and settings unknown")
    else:
        run.notes.append("no results.json: the model and settings are unknown")
    if spec:
        methods = [m.get("method", "?") + "".join(f":{k}={v}" for k, v in m.items() if k != "method")
                   for m in spec.get("methods") or []]
        budgets = [f"ratio={r:g}" for r in spec.get("ratios") or []] + [f"keep={k}" for k in spec.get("keeps") or []]
        run.meta[:0] = [(k, v) for k, v in [
            ("model", str(spec.get("model", ""))),
            ("model class", str(spec.get("model_class", ""))),
            ("tasks", ", ".join(map(str, spec.get("tasks") or []))),
            ("methods", ", ".join(methods)),
            ("budgets", ", ".join(budgets)),
            ("span policy / positions", f"{spec.get('budget', '')} / {spec.get('positions', '')}"),
            ("limit", str(spec.get("limit"))),
            ("batch size / device / seed", f"{spec.get('batch_size')} / {spec.get('device') or 'auto'} / "
                                           f"{spec.get('seed')}"),
            ("generation", str(spec.get("gen_kwargs") or "task defaults")),
        ] if v]
    if (root / "results.csv").is_file():
        for r in _read_csv(root / "results.csv"):
            method = r.get("method") or "?"
            budget = r.get("budget") or "-"
            run.rows.append({
                "task": r.get("task", ""), "metric": r.get("metric", ""), "method": method, "budget": budget,
                "setting": "baseline" if method == "none" else f"{method} {budget}",
                **{k: _float(r.get(k)) for k in ("score", "stderr", "pct_of_baseline", "visual_kept",
                                                  "visual_before", "mean_visual_per_layer", "prefill_ms")},
            })
        if not run.meta and run.rows:
            model = next((r.get("model") for r in _read_csv(root / "results.csv") if r.get("model")), None)
            if model:
                run.meta.append(("model", model))
    else:
        run.notes.append("no results.csv: no results table or plots")
    metrics_of: dict[str, list[str]] = {}
    for r in run.rows:
        metrics_of.setdefault(r["task"], [])
        if r["metric"] not in metrics_of[r["task"]]:
            metrics_of[r["task"]].append(r["metric"])
    overlays: list[Path] = []
    if (root / "samples.jsonl").is_file():
        records, bad = _read_jsonl(root / "samples.jsonl")
        if bad:
            run.notes.append(f"samples.jsonl: {bad} line(s) were not JSON and are left out")
        for rec in records:
            task = str(rec.get("task", ""))
            metric = next((m for m in metrics_of.get(task, []) if m in rec), None)
            if metric is None:  # no table row for the task: its first numeric per-sample field
                metric = next((k for k, v in rec.items() if k not in _SAMPLE_KEYS and _float(v) is not None), None)
            overlay, missing = None, False
            if isinstance(rec.get("overlay"), str) and rec["overlay"]:  # null: not drawn for this document
                path = root / rec["overlay"]
                overlay, missing = (path, False) if path.is_file() else (None, True)
                if path.is_file():
                    overlays.append(path)
            run.samples.append({
                "task": task, "doc_id": rec.get("doc_id"), "setting": str(rec.get("setting", "")),
                "method": str(rec.get("method", "")), "question": rec.get("question"), "target": rec.get("target"),
                "response": rec.get("response"), "metric": metric,
                "value": rec.get(metric) if metric else None, "visual_after": _float(rec.get("visual_after")),
                "visual_before": _float(rec.get("visual_before")), "prefill_ms": _float(rec.get("prefill_ms")),
                "overlay": overlay, "overlay_missing": missing, "has_overlay": bool(rec.get("overlay")),
            })
        _order_settings(run, settings_order)
        if run.samples and not any(s["question"] for s in run.samples):
            run.notes.append("no questions in samples.jsonl (written by an older vtprune eval): rerun it to log "
                             "each document's prompt")
    else:
        run.notes.append("no samples.jsonl: no per-sample answers to show")
    if run.samples and not any(s["has_overlay"] for s in run.samples):
        run.notes.append("no overlays saved: run vtprune eval --save-overlays N to see the kept tokens of N "
                         "documents per setting")
    missing = sum(s["overlay_missing"] for s in run.samples)
    if missing:
        run.notes.append(f"{missing} overlay file(s) named in samples.jsonl do not exist under {root}")
    run.images = _pngs(root, overlays)
    return run


_SAMPLE_KEYS = {"setting", "method", "budget", "task", "doc_id", "question", "target", "response", "prefill_ms",
                "batch_rows", "prompt_tokens", "visual_before", "visual_after", "mean_visual_per_layer",
                "select_ms", "overlay"}


def _order_settings(run: Run, order: Sequence[str]) -> None:
    """Samples in the order the settings ran (baseline first), documents in their order."""
    rank = {s: i for i, s in enumerate(order)}
    for s in run.samples:
        rank.setdefault(s["setting"], len(rank))
    run.samples.sort(key=lambda s: rank[s["setting"]])


def _video_label(config: dict[str, Any]) -> tuple[str, str]:
    method = str(config.get("method") or "none")
    if config.get("layer"):
        method += f"(layer={config['layer']})"
    if method == "none":
        return "none", "-"
    if config.get("ratio") is not None:
        return method, f"ratio={config['ratio']:g}"
    return method, f"keep={config.get('keep')}"


def load_video_qa(dirs: Sequence[Path], root: Path) -> Run:
    """One or several ``vtprune video-qa`` run directories as one table (each run is a setting)."""
    run = Run("video-qa", root, f"vtprune video-qa: {root.resolve().name}")
    runs = []
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else None
        records, bad = _read_jsonl(d / "predictions.jsonl") if (d / "predictions.jsonl").is_file() else ([], 0)
        if bad:
            run.notes.append(f"{d.name}/predictions.jsonl: {bad} line(s) were not JSON and are left out")
        if summary is None:
            run.notes.append(f"{d.name}: no summary.json (the run did not finish); scored from predictions.jsonl")
        config = (summary or {}).get("config") or (records[0].get("config") if records else {}) or {}
        runs.append((d, summary, records, config))
    runs.sort(key=lambda r: (r[3].get("method") or "none") != "none")  # the unpruned run first, as in eval
    models = sorted({str(c.get("model")) for *_, c in runs})
    run.meta.append(("model" + ("s" if len(models) > 1 else ""), ", ".join(models)))
    run.meta.append(("runs", ", ".join(d.name for d, *_ in runs)))
    base_acc: dict[str, float] = {}
    for _d, summary, records, config in runs:
        acc = _float((summary or {}).get("accuracy"))
        if acc is None and records:
            acc = sum(bool(r.get("correct")) for r in records) / len(records)
        if (config.get("method") or "none") == "none" and acc is not None:
            base_acc[str(config.get("model"))] = acc
    for d, summary, records, config in runs:
        method, budget = _video_label(config)
        setting = d.name if d != root else ("baseline" if method == "none" else f"{method} {budget}")
        s = summary or {}

        def mean(key: str, recs: list[dict[str, Any]] = records) -> float | None:
            vals = [_float(r.get(key)) for r in recs]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else None

        acc = _float(s.get("accuracy"))
        if acc is None and records:
            acc = sum(bool(r.get("correct")) for r in records) / len(records)
        base = base_acc.get(str(config.get("model")))
        common = {"method": method, "budget": budget, "setting": setting, "stderr": None,
                  "visual_kept": _float(s.get("visual_after")) or mean("visual_after"),
                  "visual_before": _float(s.get("visual_before")) or mean("visual_before"),
                  "prefill_ms": _float(s.get("prefill_ms")) or mean("prefill_ms")}
        common["mean_visual_per_layer"] = common["visual_kept"]
        run.rows.append({"task": "video-qa", "metric": "accuracy", "score": acc,
                         "pct_of_baseline": 100 * acc / base if base and acc is not None else None, **common})
        for kind, kacc in (s.get("accuracy_by_kind") or {}).items():
            run.rows.append({"task": "video-qa", "metric": f"accuracy [{kind}]", "score": _float(kacc),
                             "pct_of_baseline": None, **common})
        for r in records:
            question = str(r.get("question", ""))
            if r.get("options"):
                question += "\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(r["options"]))
            target = str(r.get("answer", ""))
            if r.get("gold") and str(r["gold"]) != target:
                target += f" ({r['gold']})"
            overlay = d / r["overlay"] if isinstance(r.get("overlay"), str) else None
            run.samples.append({
                "task": "video-qa", "doc_id": r.get("id"), "setting": setting, "method": method,
                "question": question, "target": target, "response": r.get("prediction"), "metric": "correct",
                "value": bool(r.get("correct")), "visual_after": _float(r.get("visual_after")),
                "visual_before": _float(r.get("visual_before")), "prefill_ms": _float(r.get("prefill_ms")),
                "overlay": overlay if overlay is not None and overlay.is_file() else None,
                "overlay_missing": overlay is not None and not overlay.is_file(), "has_overlay": bool(r.get("overlay")),
            })
    if len(runs) > 1 and not base_acc:
        run.notes.append("no unpruned run (video-qa --method none) among these: no % of baseline")
    run.images = _pngs(root) + [p for d, *_ in runs if d != root for p in _pngs(d)]
    return run


def load_bench(root: Path) -> Run:
    """A ``vtprune demo`` / ``vtprune accuracy`` output directory: its CSVs as the table, its PNGs."""
    kinds = [name for name in ("demo.csv", "accuracy.csv", "accuracy_vllm.csv") if (root / name).is_file()]
    run = Run("demo" if "demo.csv" in kinds else "accuracy", root,
              f"vtprune {' / '.join(k.split('.')[0] for k in kinds)}: {root.resolve().name}")
    for name in kinds:
        task = {"demo.csv": "synthetic VQA (demo)", "accuracy.csv": "synthetic VQA",
                "accuracy_vllm.csv": "synthetic VQA (vLLM)"}[name]
        for r in _read_csv(root / name):
            method = r.get("method", "?")
            retention = _float(r.get("retention"))
            run.rows.append({
                "task": task, "metric": "accuracy", "method": method,
                "budget": "-" if method == "none" else f"keep={r.get('budget')}",
                "setting": "baseline" if method == "none" else f"{method} keep={r.get('budget')}",
                "score": _float(r.get("accuracy")), "stderr": None,
                "pct_of_baseline": 100 * retention if retention is not None else None,
                "visual_kept": _float(r.get("kept")), "visual_before": 576.0,
                "mean_visual_per_layer": _float(r.get("per_layer", r.get("mean_per_layer"))),
                "prefill_ms": _float(r.get("prefill_ms")),
            })
    run.images = _pngs(root)
    run.plot_rows = not run.images
    run.notes.append("no per-sample answers: vtprune demo / accuracy keep only the aggregates")
    return run


def _kind(d: Path) -> str | None:
    if (d / "results.csv").is_file() or (d / "samples.jsonl").is_file():
        return "eval"
    if (d / "predictions.jsonl").is_file() or (d / "summary.json").is_file():
        return "video-qa"
    if any((d / n).is_file() for n in ("demo.csv", "accuracy.csv", "accuracy_vllm.csv")):
        return "bench"
    return None


def load(root: str | Path) -> list[Run]:
    """The sections for ``root``: the directory itself when it is an output directory, else each output
    directory directly under it (video-qa runs merged into one section)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    kind = _kind(root)
    if kind == "eval":
        return [load_eval(root)]
    if kind == "video-qa":
        return [load_video_qa([root], root)]
    if kind == "bench":
        return [load_bench(root)]
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and _kind(d)]
    runs = [load_eval(d) for d in subdirs if _kind(d) == "eval"]
    runs += [load_bench(d) for d in subdirs if _kind(d) == "bench"]
    video = [d for d in subdirs if _kind(d) == "video-qa"]
    if video:
        runs.append(load_video_qa(video, root))
    if not runs:
        raise FileNotFoundError(f"{root} holds no vtprune eval / video-qa / demo / accuracy output (looked for "
                                "results.csv, samples.jsonl, predictions.jsonl, summary.json, demo.csv, "
                                "accuracy.csv, there and one level down)")
    return runs


# ============================================================================ images
def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail(path: Path) -> str | None:
    """A data URI of ``path`` shrunk to THUMB_PX (PNG, or JPEG when the PNG is large); None if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            if buf.tell() > 96_000:  # photographs: JPEG is ~5x smaller at this size
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=85)
                return _data_uri(buf.getvalue(), "image/jpeg")
            return _data_uri(buf.getvalue())
    except Exception:
        return None


def _plots(run: Run) -> tuple[list[tuple[str, str]], str | None]:
    """(caption, data URI) per task: its metrics' scores and the prefill time against the visual tokens kept."""
    rows = [r for r in run.rows if r["visual_kept"] is not None]
    if not rows:
        return [], None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install matplotlib)"
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        metrics = list(dict.fromkeys(r["metric"] for r in task_rows))
        has_prefill = any(r["prefill_ms"] is not None for r in task_rows)
        # the first metric beside the prefill time, then up to 3 more (the table has them all)
        panels = [(m, "score") for m in metrics[:4]]
        if has_prefill:
            panels.insert(1, ("prefill", "prefill_ms"))
        ncols = min(2, len(panels))  # wider would be scaled down to the page, its text with it
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.5 * nrows), squeeze=False)
        methods = [m for m in dict.fromkeys(r["method"] for r in task_rows) if m not in _UNPRUNED]
        styles = method_styles(methods)
        for ax, (metric, key) in zip(axes.flat, panels):
            sel = [r for r in task_rows if key == "prefill_ms" or r["metric"] == metric]
            if key == "prefill_ms":  # one prefill time per setting, whatever the metric
                sel = list({r["setting"]: r for r in sel}.values())
            for method in methods:
                pts = sorted((r["visual_kept"], r[key]) for r in sel if r["method"] == method and r[key] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **styles[method])
            base = next((r[key] for r in sel if r["method"] in _UNPRUNED and r[key] is not None), None)
            if base is not None:
                ax.axhline(base, color="#808080", linestyle="--", linewidth=1.2, label="unpruned")
            before = max((r["visual_before"] for r in task_rows if r["visual_before"]), default=None)
            if before:  # from none to all kept: one budget alone would otherwise fill the axis
                ax.set_xlim(0, before * 1.04)
            ax.set_xlabel("visual tokens kept (mean per sample)")
            ax.set_ylabel("prefill ms (mean per call)" if key == "prefill_ms" else metric)
            ax.set_title(f"{task}: {'prefill time' if key == 'prefill_ms' else metric}", fontsize=10)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        legend_below(fig, fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        out.append((f"{task}: score and prefill time against the visual tokens kept (baseline dashed grey)",
                     _data_uri(buf.getvalue())))
    return out, None


# ============================================================================ HTML
def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "–"
    if digits and float(v).is_integer() and abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def _kept(kept: float | None, before: float | None, per_layer: float | None = None) -> str:
    if kept is None:
        return "–"
    text = f"{_num(kept)} / {_num(before)}" if before is not None else _num(kept)
    if per_layer is not None and abs(per_layer - kept) > 0.5:  # in-LLM pruning sees every token before its layer
        text += f" ({_num(per_layer)} avg/layer)"
    return text


def _verdict(value: Any) -> tuple[str, str]:
    """(cell text, row class) of a per-sample metric value: right / wrong for 0/1 metrics, else the number."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return ("✓ right", "right") if value else ("✗ wrong", "wrong")
    f = _float(value)
    if f is not None:
        return f"{f:.3g}", ""
    return ("–" if value is None else _e(value)), ""


def _swatch(style: dict[str, Any] | None) -> str:
    if not style:
        return ""
    return f'<span class="sw" style="background:{_e(style["color"])}"></span>'


def _results_table(run: Run, styles: dict[str, dict[str, Any]]) -> str:
    head = ("task", "metric", "method", "budget", "score", "% of baseline", "visual tokens kept", "prefill ms")
    out = ['<table class="results"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in run.rows:
        score = _num(r["score"], 4) + (f" ± {r['stderr']:.4f}" if r.get("stderr") else "")
        pct = r["pct_of_baseline"]
        cls = ' class="base"' if r["method"] in _UNPRUNED else ""
        bar = "" if pct is None else f'<span class="bar" style="width:{max(0.0, min(pct, 100.0)) * 0.6:.0f}px"></span>'
        cells = [_e(r["task"]), _e(r["metric"]), _swatch(styles.get(r["method"])) + _e(r["method"]), _e(r["budget"]),
                 _e(score), bar + _e(_num(pct)), _e(_kept(r["visual_kept"], r["visual_before"],
                                                          r["mean_visual_per_layer"])), _e(_num(r["prefill_ms"]))]
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _samples_html(run: Run, styles: dict[str, dict[str, Any]], max_samples: int) -> tuple[str, int, int]:
    """The per-document blocks; returns (html, documents shown, documents in all)."""
    docs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in run.samples:
        docs.setdefault((s["task"], str(s["doc_id"])), []).append(s)
    shown = list(docs.items())[:max(0, max_samples)]
    out = []
    for (task, doc_id), items in shown:
        question = next((s["question"] for s in items if s["question"]), None)
        target = next((s["target"] for s in items if s["target"] is not None), None)
        verdicts = {_verdict(s["value"])[0] for s in items}
        agree = "1" if len(verdicts) <= 1 else "0"
        out.append(f'<section class="doc" data-agree="{agree}"><h3>{_e(task)} · document {_e(doc_id)}'
                   + ("" if agree == "1" else ' <span class="diff">settings differ</span>') + "</h3>")
        out.append('<div class="qa"><div><b>question</b><pre>'
                   + (_e(question) if question else '<i class="muted">not logged</i>') + "</pre></div>"
                   + f"<div><b>target</b><pre>{_e(_json_text(target))}</pre></div></div>")
        out.append('<table class="samples"><thead><tr><th>setting</th><th>response</th><th>'
                   + _e(items[0]["metric"] or "score") + "</th><th>visual tokens kept</th><th>prefill ms</th>"
                   + "</tr></thead><tbody>")
        cards = []  # the overlays go in a strip under the table: side by side they compare at a glance
        for s in items:
            text, cls = _verdict(s["value"])
            swatch = _swatch(styles.get(s["method"]))
            out.append(f'<tr class="{cls}"><td>{swatch}{_e(s["setting"])}</td>'
                       f"<td><pre>{_e(_json_text(s['response']))}</pre></td><td>{text}</td>"
                       f"<td>{_e(_kept(s['visual_after'], s['visual_before']))}</td>"
                       f"<td>{_e(_num(s['prefill_ms']))}</td></tr>")
            if s["overlay"] is not None or s["overlay_missing"]:
                uri = _thumbnail(s["overlay"]) if s["overlay"] is not None else None
                pic = (f'<img class="thumb" src="{uri}" alt="kept tokens: {_e(s["setting"])}" '
                       'title="click to enlarge" onclick="this.classList.toggle(\'big\')">' if uri else
                       f'<div class="nopic">{"missing file" if s["overlay_missing"] else "unreadable image"}</div>')
                cards.append(f'<figure class="card {cls}">{pic}<figcaption>{swatch}{_e(s["setting"])}: '
                             f"{text}</figcaption></figure>")
        out.append("</tbody></table>")
        if cards:
            out.append('<div class="gallery">' + "".join(cards) + "</div>")
        out.append("</section>")
    return "\n".join(out), len(shown), len(docs)


def _json_text(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;margin:0;
 background:#f4f5f7}
main{max-width:1240px;margin:0 auto;padding:16px 24px 40px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #e3e5e8;
 padding-bottom:4px}h3{font-size:14px;margin:0 0 6px}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:8px 0;font-size:13px}
.meta dt{color:#666}.meta dd{margin:0;word-break:break-all}
.notes{background:#fff7e0;border:1px solid #f0d58a;border-radius:6px;padding:8px 12px 8px 28px;margin:12px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e3e5e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f1f3;position:sticky;top:0}
table.results td:nth-child(n+5){text-align:right;white-space:nowrap}
tr.base td{background:#f3f3f3;font-weight:600}
.sw{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px;border:1px solid #0004}
.bar{display:inline-block;height:8px;background:#9bc1e6;margin-right:6px;vertical-align:middle}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #e3e5e8}
figcaption{font-size:12px;color:#555}
.doc{border:1px solid #e3e5e8;border-radius:6px;padding:10px 12px;margin:12px 0}
.qa{display:grid;grid-template-columns:3fr 1fr;gap:12px}
pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace}
tr.right td:nth-child(3){color:#17803d;font-weight:600}tr.wrong td:nth-child(3){color:#c62828;font-weight:600}
tr.wrong{background:#fff4f4}
.diff{font-weight:normal;font-size:12px;background:#fde2b8;border-radius:3px;padding:1px 6px;margin-left:6px}
.gallery{display:flex;flex-wrap:wrap;gap:8px;margin-top:8px}
.card{margin:0;border:1px solid #e3e5e8;border-radius:4px;padding:4px;font-size:12px;max-width:min(660px,90vw)}
.card figcaption{color:#333;padding-top:2px}.card.wrong{border-color:#e8a0a0}
img.thumb{display:block;width:170px;cursor:zoom-in;border:0}
img.thumb.big{width:auto;max-width:100%;cursor:zoom-out}
.nopic{width:170px;height:60px;display:flex;align-items:center;justify-content:center;color:#888;background:#f6f6f6}
.muted{color:#888}.small{font-size:12px;color:#777}
body.only-diff .doc[data-agree="1"]{display:none}
"""

# Runs on load: marks how many images decoded (tests read it with chromium --dump-dom), and wires the filter.
_JS = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var s = document.getElementById("img-status");
  s.setAttribute("data-loaded", ok); s.setAttribute("data-total", imgs.length);
  s.textContent = ok + " of " + imgs.length + " images decoded";
});
function onlyDiff(box) { document.body.classList.toggle("only-diff", box.checked); }
"""


def render(runs: Sequence[Run], max_samples: int = DEFAULT_MAX_SAMPLES, title: str | None = None) -> str:
    """The page for ``runs``."""
    title = title or (runs[0].title if len(runs) == 1 else f"vtprune report: {len(runs)} runs")
    body: list[str] = [f"<h1>{_e(title)}</h1>",
                       f'<p class="small">generated {_e(time.strftime("%Y-%m-%d %H:%M"))} by vtprune report</p>']
    for i, run in enumerate(runs):
        prefix = f"{run.title} · " if len(runs) > 1 else ""
        if len(runs) > 1:
            body.append(f'<h2 id="run{i}">{_e(run.title)}</h2>')
        body.append('<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in
                                                 [("directory", str(run.root.resolve())), *run.meta]) + "</dl>")
        methods = [r["method"] for r in run.rows] + [s["method"] for s in run.samples]
        styles = method_styles([m for m in dict.fromkeys(methods) if m not in _UNPRUNED])
        notes = list(run.notes)
        plots, plot_note = _plots(run) if run.plot_rows else ([], None)
        if plot_note:
            notes.append(plot_note)
        samples_html, shown, total = _samples_html(run, styles, max_samples) if run.samples else ("", 0, 0)
        if total > shown:
            notes.append(f"showing the first {shown} of {total} documents (--max-samples {max_samples})")
        if notes:
            body.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
        body.append(f"<h2>{_e(prefix)}results</h2>")
        body.append(_results_table(run, styles) if run.rows else '<p class="muted">no results table</p>')
        if plots or run.images:
            body.append(f"<h2>{_e(prefix)}plots</h2>")
        for caption, uri in plots:
            body.append(f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>')
        for path in run.images:
            body.append(f'<figure><img src="{_data_uri(path.read_bytes())}" alt="{_e(path.name)}">'
                        f"<figcaption>{_e(path.relative_to(run.root) if path.is_relative_to(run.root) else path)}"
                        "</figcaption></figure>")
        if run.samples:
            body.append(f"<h2>{_e(prefix)}samples</h2>")
            body.append(f'<p class="small">{shown} of {total} documents; a row per setting. <label><input '
                        'type="checkbox" onchange="onlyDiff(this)"> only documents where the settings differ'
                        "</label></p>")
            body.append(samples_html)
    body.append('<p id="img-status" class="small"></p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n" + "\n".join(body)
            + f"\n</main><script>{_JS}</script></body></html>\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtprune report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("out_dir", metavar="OUT_DIR", help="a vtprune eval / video-qa / demo / accuracy output directory "
                                                      "(or a folder of them)")
    p.add_argument("--out", help="the HTML file to write (default: OUT_DIR/report.html)")
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES,
                   help=f"documents shown with their per-setting answers (default {DEFAULT_MAX_SAMPLES})")
    p.add_argument("--title", help="the page title (default: from the directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vtprune report``."""
    args = build_parser().parse_args(argv)
    try:
        runs = load(args.out_dir)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"vtprune report: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.out_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs, max_samples=args.max_samples, title=args.title), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
