"""Video QA with visual-token pruning: answer, score and time a video question set; resumable.

    python scripts/video_qa.py --model tiny:qwen2_vl --data DIR/annotations.json \\
        --method kcenter --ratio 0.75 --budget per_frame --frames 8
    python scripts/video_qa.py --model /models/Qwen2.5-VL-7B-Instruct --data qa.csv --method fastv \\
        --ratio 0.5 --layer 2 --fps 1 --max-frames 32 --dtype bfloat16

``--model`` is a local transformers checkpoint directory (model + tokenizer + preprocessor configs; the
video pixels are built by ``vtprune.video``, so torchvision is not needed) or ``tiny:<family>`` for a
random-weight tiny model (plumbing and timing only: its answers are noise).

``--data`` is a JSON list (or ``{"items": [...]}``), JSONL or CSV of items with ``video`` (a path relative
to the data file, or ``--video-root``), ``question``, ``answer`` and optionally ``options`` (a JSON list or
``"a|b|c"`` in CSV; or CSV columns ``A``, ``B``, ...), ``id`` and ``kind``. With options the question is
multiple choice: the options are listed with letters, the model is asked for a letter, and a prediction
is right when its letter (or, failing a letter, its option text) is the answer's. Without options the
score is normalised exact match (case, punctuation, articles and number words ignored).

Outputs in ``--out`` (default ``out/video_qa/<model>-<method>-<budget>-<amount>-<sampling>``):
``predictions.jsonl`` (one record per item, written as it is answered) and ``summary.json``; with
``--save-overlays N``, ``overlays/<id>.png`` for the first N items (the kept tokens over the sampled frames). A second
run with the same options skips the items already in ``predictions.jsonl``; a run with other options
into the same directory is refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vtprune import spec

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}


# ----------------------------------------------------------------------------------------------- data


def load_items(path: str | os.PathLike, video_root: str | None = None) -> list[dict[str, Any]]:
    """Read the question set; resolve video paths; give every item a stable ``id``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else data.get("items") or data.get("data")
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of items or {{'items': [...]}}")
    root = Path(video_root) if video_root else path.parent
    items = []
    for i, row in enumerate(rows):
        missing = [k for k in ("video", "question", "answer") if not str(row.get(k, "")).strip()]
        if missing:
            raise ValueError(f"{path}: item {i} has no {', '.join(missing)}")
        options = _options(row)
        video = Path(str(row["video"]))
        item = {"id": str(row.get("id") or f"{row['video']}::{row['question']}"),
                "video": str(video if video.is_absolute() else root / video), "question": str(row["question"]),
                "answer": str(row["answer"]), "options": options, "kind": row.get("kind") or None}
        if options and gold_letter(item) is None:
            raise ValueError(f"{path}: item {item['id']!r}: answer {item['answer']!r} is neither an option letter "
                             f"nor one of the options {options}")
        items.append(item)
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: item ids are not unique (give an 'id' column)")
    return items


def _options(row: dict[str, Any]) -> list[str] | None:
    opts = row.get("options")
    if isinstance(opts, str) and opts.strip():
        text = opts.strip()
        opts = json.loads(text) if text.startswith("[") else [o.strip() for o in text.split("|")]
    if not opts:  # CSV columns A, B, C, ...
        opts = [row[c] for c in LETTERS if str(row.get(c) or "").strip()]
    return [str(o) for o in opts] or None


# ---------------------------------------------------------------------------------------------- scoring


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, number words as digits, single spaces."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


def gold_letter(item: dict[str, Any]) -> str | None:
    """The answer's option letter: the answer itself when it is a letter in range, else its option's."""
    opts, ans = item["options"], item["answer"].strip()
    if len(ans) == 1 and ans.upper() in LETTERS[: len(opts)]:
        return ans.upper()
    matches = [i for i, o in enumerate(opts) if normalise(o) == normalise(ans)]
    return LETTERS[matches[0]] if len(matches) == 1 else None


def parse_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option a free-form reply picks: a standalone letter ("B", "(B)", "B. red"), else the only option
    whose text it contains."""
    valid = LETTERS[: len(options)]
    m = re.search(rf"(?<![A-Za-z])([{valid}])(?![A-Za-z])", prediction.strip())
    if m:
        return m.group(1)
    said = f" {normalise(prediction)} "
    hits = [i for i, o in enumerate(options) if normalise(o) and f" {normalise(o)} " in said]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def format_question(item: dict[str, Any]) -> str:
    """The text asked: the question, plus lettered options and the letter instruction for multiple choice."""
    if not item["options"]:
        return item["question"]
    lines = [item["question"], *(f"{LETTERS[i]}. {o}" for i, o in enumerate(item["options"])), MC_INSTRUCTION]
    return "\n".join(lines)


def score(item: dict[str, Any], prediction: str) -> tuple[str | None, bool]:
    """(parsed answer, correct)."""
    if item["options"]:
        letter = parse_letter(prediction, item["options"])
        return letter, letter is not None and letter == gold_letter(item)
    parsed = normalise(prediction)
    return parsed, parsed == normalise(item["answer"])


# ---------------------------------------------------------------------------------------------- model


def load_model(spec: str, items: Sequence[dict[str, Any]], *, dtype: str, attn: str, device: str, seed: int,
               frames: int) -> tuple[Any, Any, str]:
    """(model, VideoInputBuilder, tag) for a local checkpoint or ``tiny:<family>``."""
    import torch

    from vtprune import video as V

    torch_dtype = getattr(torch, dtype)
    if spec.startswith("tiny:"):
        from vtprune.testing import tiny

        family = spec.split(":", 1)[1]
        if family not in V.video_families():
            raise ValueError(f"tiny:{family} takes no video; video families: {', '.join(V.video_families())}")
        model = tiny.build(family, attn, seed=seed, dtype=torch_dtype).to(device)
        texts = [format_question(it) for it in items] + [it["answer"] for it in items]
        return model, V.tiny_builder(model, texts, frames=frames), f"tiny-{family}"
    from transformers import AutoModelForImageTextToText

    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a local checkpoint directory nor tiny:<family> "
                                "(nothing is downloaded)")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    return model.to(device).eval(), V.VideoInputBuilder.from_pretrained(path), path.name


def _visual_placeholders(builder: Any, ids: Any) -> int:
    """Video placeholder tokens, counted as ``PruneStats.visual_before`` counts them (structural ones too)."""
    return int((ids == builder.video_token_id).sum())


# -------------------------------------------------------------------------------------------------- run


def parse_kv(pairs: Sequence[str]) -> dict[str, Any]:
    """["seed=1", "variant=todre"] -> {"seed": 1, "variant": "todre"} (values parsed by :mod:`vtprune.spec`)."""
    try:
        return spec.parse_pairs(pairs)
    except ValueError as exc:
        raise ValueError(f"--method-arg: {exc}") from None


def _layers(text: str | None) -> int | tuple[int, ...] | None:
    if text is None:
        return None
    parts = [int(x) for x in text.split(",") if x.strip()]
    return parts[0] if len(parts) == 1 else tuple(parts)


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options that change results: a resumed run must match them."""
    config = {"model": args.model, "method": args.method, "ratio": args.ratio, "keep": args.keep,
            "layer": args.layer, "budget": args.budget, "positions": args.positions,
            "method_args": parse_kv(args.method_arg), "frames": None if args.fps else args.frames, "fps": args.fps,
            "max_frames": args.max_frames, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
            "attn": args.attn}
    return json.loads(json.dumps(config))  # as stored in predictions.jsonl (tuples become lists)


def default_out(args: argparse.Namespace) -> Path:
    model = args.model.replace("tiny:", "tiny-") if args.model.startswith("tiny:") else Path(args.model).name
    amount = "full" if args.method == "none" else (f"r{args.ratio:g}" if args.ratio is not None else f"k{args.keep}")
    layer = f"-L{args.layer.replace(',', '_')}" if args.layer else ""
    sampling = f"fps{args.fps:g}" if args.fps else f"f{args.frames}"
    return Path("out/video_qa") / f"{model}-{args.method}{layer}-{args.budget}-{amount}-{sampling}"


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Records already written; a line cut short by an interrupted run is dropped (and the file rewritten)."""
    if not path.is_file():
        return []
    good, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    if bad:
        path.write_text("".join(json.dumps(r) + "\n" for r in good))
    return good


def summarise(records: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Accuracy (overall and per kind), visual tokens kept, timings (means; prefill also median)."""
    def mean(key: str) -> float:
        vals = [r[key] for r in records if r.get(key) is not None]
        return round(statistics.fmean(vals), 3) if vals else float("nan")

    n = len(records)
    kinds: dict[str, list[bool]] = {}
    for r in records:
        if r.get("kind"):
            kinds.setdefault(r["kind"], []).append(r["correct"])
    before, after = sum(r["visual_before"] for r in records), sum(r["visual_after"] for r in records)
    prefill = [r["prefill_ms"] for r in records]
    return {
        "n": n, "accuracy": round(sum(r["correct"] for r in records) / n, 4) if n else float("nan"),
        "accuracy_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(kinds.items())},
        "multiple_choice": sum(bool(r["options"]) for r in records),
        "frames": mean("frames"), "visual_before": mean("visual_before"), "visual_after": mean("visual_after"),
        "kept_fraction": round(after / before, 4) if before else float("nan"),
        "prefill_ms": mean("prefill_ms"), "prefill_ms_median": round(statistics.median(prefill), 3) if n else None,
        "select_ms": mean("select_ms"), "load_ms": mean("load_ms"), "preprocess_ms": mean("preprocess_ms"),
        "generate_ms": mean("generate_ms"), "e2e_ms": mean("e2e_ms"), "config": config,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Answer every remaining item, append to predictions.jsonl, write and return the summary."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if args.method != "none" and (args.ratio is None) == (args.keep is None):
        raise SystemExit("video-qa: give --ratio or --keep with a pruning method (or --method none)")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_of(args)
    out = Path(args.out) if args.out else default_out(args)
    out.mkdir(parents=True, exist_ok=True)
    pred_path, summary_path = out / "predictions.jsonl", out / "summary.json"
    if not args.resume and pred_path.exists():
        pred_path.unlink()
    done = read_predictions(pred_path)
    for r in done[:1]:
        if r.get("config") != config:
            raise SystemExit(f"video-qa: {pred_path} holds results of other options ({r.get('config')}); "
                             "use another --out or --no-resume")
    all_items = load_items(args.data, args.video_root)
    items = all_items[: args.limit] if args.limit else all_items
    seen = {r["id"] for r in done}
    todo = [it for it in items if it["id"] not in seen]
    if todo:
        _answer(args, config, all_items, todo, pred_path, already=len(items) - len(todo))
    wanted = {it["id"] for it in items}
    records = [r for r in read_predictions(pred_path) if r["id"] in wanted]
    summary = summarise(records, config)
    summary["resumed"] = sum(r["id"] in wanted for r in done)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    if args.progress:
        print(format_summary(summary, out))
    return summary


def _answer(args: argparse.Namespace, config: dict[str, Any], all_items: Sequence[dict[str, Any]],
            todo: Sequence[dict[str, Any]], pred_path: Path, already: int = 0) -> None:
    """Load the model, prune it, answer ``todo`` and append one record per item to ``pred_path``."""
    import torch
    from tqdm import tqdm

    import vtprune
    from vtprune.bench.timing import PrefillClock
    from vtprune.video import load_video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # a tiny model's vocabulary comes from ALL items, so --limit runs and resumed runs tokenise alike
    model, builder, _ = load_model(args.model, all_items, dtype=args.dtype, attn=args.attn, device=device,
                                   seed=args.seed, frames=args.max_frames or args.frames)
    handle = None
    if args.method != "none":
        method = spec.build(args.method, **parse_kv(args.method_arg))  # a name or a spec such as "fastv:layer=2"
        handle = vtprune.prune(model, method, args.ratio, keep=args.keep, layer=_layers(args.layer),
                               budget=args.budget, positions=args.positions)
    timer = PrefillClock(model)  # vision tower + selection + LLM prefill of each generate()
    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    drawn = 0
    try:
        with open(pred_path, "a") as f, torch.inference_mode():
            for item in tqdm(todo, desc="video-qa", unit="q", initial=already, total=already + len(todo),
                             disable=not args.progress, dynamic_ncols=True):
                t0 = time.perf_counter()
                clip = load_video(item["video"], num_frames=None if args.fps else args.frames, fps=args.fps,
                                  max_frames=args.max_frames, backend=args.backend)
                t1 = time.perf_counter()
                inputs = builder(clip, format_question(item), dtype=model.dtype)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                t2 = time.perf_counter()
                timer.reset()
                ids = model.generate(**inputs, **gen)
                sync()
                t3 = time.perf_counter()
                prediction = builder.decode(ids[0, inputs["input_ids"].shape[1] :])
                parsed, correct = score(item, prediction)
                if handle is not None:
                    before, after = handle.stats.visual_before[0], handle.stats.visual_after[0]
                    select_ms = handle.stats.select_ms
                else:
                    before = after = _visual_placeholders(builder, inputs["input_ids"])
                    select_ms = 0.0
                record = {
                    **item, "gold": gold_letter(item) if item["options"] else normalise(item["answer"]),
                    "prediction": prediction, "parsed": parsed, "correct": correct, "frames": len(clip),
                    "frame_indices": clip.indices.tolist(), "visual_before": before, "visual_after": after,
                    "prompt_tokens": int(inputs["input_ids"].shape[1]),
                    "load_ms": round((t1 - t0) * 1e3, 3), "preprocess_ms": round((t2 - t1) * 1e3, 3),
                    "prefill_ms": round(timer.ms, 3), "select_ms": round(select_ms, 3),
                    "generate_ms": round((t3 - t2) * 1e3, 3), "e2e_ms": round((t3 - t0) * 1e3, 3),
                    "config": config,
                }
                if handle is not None and drawn < args.save_overlays:
                    record["overlay"] = _overlay(pred_path.parent, item, clip, handle, builder, prediction, config)
                    drawn += 1
                f.write(json.dumps(record) + "\n")
                f.flush()  # a crash loses at most the item in flight
    finally:
        timer.remove()
        if handle is not None:
            handle.remove()


def _overlay(out: Path, item: dict[str, Any], clip: Any, handle: Any, builder: Any, prediction: str,
             config: dict[str, Any]) -> str:
    """Draw the kept tokens of the last prefill over the sampled frames (one picture per token frame: Qwen's
    temporal patch shows its first frame); returns the PNG's path relative to ``out``."""
    from vtprune.show import Entry, figure

    video = handle.kept_masks()[-1]  # the prompt's video (after any image)
    step = len(clip) / video.frames
    pictures = [clip.frames[int(t * step)] for t in range(video.frames)]
    amount = f"ratio={config['ratio']}" if config["ratio"] is not None else f"keep={config['keep']}"
    entry = Entry(f"{config['method']} {amount} {config['budget']}", video, answer=prediction)
    rel = Path("overlays") / f"{''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in str(item['id']))}.png"
    figure(pictures, [entry], handle.adapter, out / rel, processor=getattr(builder, "processor", None),
           title=f"{item['question']} (answer: {item['answer']})", height=112)
    return rel.as_posix()


def format_summary(s: dict[str, Any], out: Path) -> str:
    c = s["config"]
    amount = f" ratio={c['ratio']}" if c["ratio"] is not None else f" keep={c['keep']}"
    amount = "" if c["method"] == "none" else f"{amount} budget={c['budget']}"
    lines = [
        f"{c['model']} | {c['method']}{amount} | {s['n']} questions "
        f"({s['resumed']} from a previous run)",
        f"accuracy {s['accuracy']:.3f}" + "".join(f"  {k}={v:.2f}" for k, v in s["accuracy_by_kind"].items()),
        f"visual tokens {s['visual_before']:.1f} -> {s['visual_after']:.1f} (kept {s['kept_fraction']:.3f}), "
        f"{s['frames']:.1f} frames",
        f"prefill {s['prefill_ms']:.1f} ms (median {s['prefill_ms_median']:.1f}, selection {s['select_ms']:.2f}), "
        f"end-to-end {s['e2e_ms']:.1f} ms (video {s['load_ms']:.1f}, inputs {s['preprocess_ms']:.1f}, "
        f"generate {s['generate_ms']:.1f})",
        f"-> {out / 'predictions.jsonl'}, {out / 'summary.json'}",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The video-qa options (shared by this script and ``vtprune video-qa``)."""
    from vtprune.budget import POLICIES
    from vtprune.video import BACKENDS

    p.add_argument("--model", required=True, help="local checkpoint directory, or tiny:<family> (random weights)")
    p.add_argument("--data", required=True,
                   help="questions: .json / .jsonl / .csv with video, question, answer[, options]")
    p.add_argument("--video-root", help="directory video paths are relative to (default: the data file's)")
    p.add_argument("--out", help="output directory (default: out/video_qa/<model>-<method>-<budget>-<amount>-<frames>)")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", default="none", help="a vtprune method (see `vtprune methods`) or 'none' (unpruned)")
    amount = g.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of visual tokens REMOVED per span, in [0, 1)")
    amount.add_argument("--keep", type=int, help="visual tokens kept per span")
    g.add_argument("--layer", help="decoder layer(s) to prune at, e.g. 2 or 7,9,12 (default: the method's stage)")
    g.add_argument("--budget", default="per_frame", choices=POLICIES,
                   help="span policy: per_frame (each frame), per_image (a video pooled), global, or temporal "
                        "(a video's per-frame budgets re-allocated by frame novelty)")
    g.add_argument("--positions", default="original", choices=("original", "compact"))
    g.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable (values parsed as Python literals), e.g. variant=todre")
    s = p.add_argument_group("frames")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--frames", type=int, default=8, help="frames sampled uniformly (default 8)")
    how.add_argument("--fps", type=float, help="sample one frame every 1/FPS seconds instead")
    s.add_argument("--max-frames", type=int, help="cap on sampled frames (fps sampling thins its grid evenly)")
    s.add_argument("--backend", default="auto", choices=BACKENDS, help="video reader (auto: decord, else PyAV)")
    r = p.add_argument_group("run")
    r.add_argument("--max-new-tokens", type=int, default=16)
    r.add_argument("--limit", type=int, help="answer only the first N questions")
    r.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    r.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    r.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--seed", type=int, default=0, help="weights seed of a tiny:<family> model")
    r.add_argument("--no-resume", dest="resume", action="store_false", help="discard earlier predictions")
    r.add_argument("--save-overlays", type=int, default=0, metavar="N",
                   help="draw the kept tokens of the first N questions answered (a strip of frames each) into "
                        "<out>/overlays/; the prediction's 'overlay' names the PNG")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or summary print")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="video-qa", description=__doc__.split("\n\n")[0]))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
