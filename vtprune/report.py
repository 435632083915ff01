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
import html
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vtprune.bench.style import legend_below, method_styles
from vtprune.report_runs import UNPRUNED, Run, as_float, load

DEFAULT_MAX_SAMPLES = 50
THUMB_PX = 320  # overlays are shrunk to this longest side: 50 documents x 10 settings must stay a few MB


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
        methods = [m for m in dict.fromkeys(r["method"] for r in task_rows) if m not in UNPRUNED]
        styles = method_styles(methods)
        for ax, (metric, key) in zip(axes.flat, panels):
            sel = [r for r in task_rows if key == "prefill_ms" or r["metric"] == metric]
            if key == "prefill_ms":  # one prefill time per setting, whatever the metric
                sel = list({r["setting"]: r for r in sel}.values())
            for method in methods:
                pts = sorted((r["visual_kept"], r[key]) for r in sel if r["method"] == method and r[key] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **styles[method])
            base = next((r[key] for r in sel if r["method"] in UNPRUNED and r[key] is not None), None)
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
    f = as_float(value)
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
        cls = ' class="base"' if r["method"] in UNPRUNED else ""
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
        styles = method_styles([m for m in dict.fromkeys(methods) if m not in UNPRUNED])
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
