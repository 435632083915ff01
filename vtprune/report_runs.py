"""Reading an output directory for ``vtprune report`` (vtprune/report.py): ``vtprune eval``, ``vtprune video-qa``
(one run directory or a folder of them), ``vtprune demo`` / ``accuracy`` directories, each into :class:`Run`, the one
shape the page is drawn from."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNPRUNED = {"none", "baseline", "-"}


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
def as_float(v: Any) -> float | None:
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
                **{k: as_float(r.get(k)) for k in ("score", "stderr", "pct_of_baseline", "visual_kept",
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
                metric = next((k for k, v in rec.items() if k not in _SAMPLE_KEYS and as_float(v) is not None), None)
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
                "value": rec.get(metric) if metric else None, "visual_after": as_float(rec.get("visual_after")),
                "visual_before": as_float(rec.get("visual_before")), "prefill_ms": as_float(rec.get("prefill_ms")),
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
        acc = as_float((summary or {}).get("accuracy"))
        if acc is None and records:
            acc = sum(bool(r.get("correct")) for r in records) / len(records)
        if (config.get("method") or "none") == "none" and acc is not None:
            base_acc[str(config.get("model"))] = acc
    for d, summary, records, config in runs:
        method, budget = _video_label(config)
        setting = d.name if d != root else ("baseline" if method == "none" else f"{method} {budget}")
        s = summary or {}

        def mean(key: str, recs: list[dict[str, Any]] = records) -> float | None:
            vals = [as_float(r.get(key)) for r in recs]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else None

        acc = as_float(s.get("accuracy"))
        if acc is None and records:
            acc = sum(bool(r.get("correct")) for r in records) / len(records)
        base = base_acc.get(str(config.get("model")))
        common = {"method": method, "budget": budget, "setting": setting, "stderr": None,
                  "visual_kept": as_float(s.get("visual_after")) or mean("visual_after"),
                  "visual_before": as_float(s.get("visual_before")) or mean("visual_before"),
                  "prefill_ms": as_float(s.get("prefill_ms")) or mean("prefill_ms")}
        common["mean_visual_per_layer"] = common["visual_kept"]
        run.rows.append({"task": "video-qa", "metric": "accuracy", "score": acc,
                         "pct_of_baseline": 100 * acc / base if base and acc is not None else None, **common})
        for kind, kacc in (s.get("accuracy_by_kind") or {}).items():
            run.rows.append({"task": "video-qa", "metric": f"accuracy [{kind}]", "score": as_float(kacc),
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
                "value": bool(r.get("correct")), "visual_after": as_float(r.get("visual_after")),
                "visual_before": as_float(r.get("visual_before")), "prefill_ms": as_float(r.get("prefill_ms")),
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
            retention = as_float(r.get("retention"))
            run.rows.append({
                "task": task, "metric": "accuracy", "method": method,
                "budget": "-" if method == "none" else f"keep={r.get('budget')}",
                "setting": "baseline" if method == "none" else f"{method} keep={r.get('budget')}",
                "score": as_float(r.get("accuracy")), "stderr": None,
                "pct_of_baseline": 100 * retention if retention is not None else None,
                "visual_kept": as_float(r.get("kept")), "visual_before": 576.0,
                "mean_visual_per_layer": as_float(r.get("per_layer", r.get("mean_per_layer"))),
                "prefill_ms": as_float(r.get("prefill_ms")),
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


