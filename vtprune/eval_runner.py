"""``vtprune eval``: the unpruned baseline and several method x budget settings on lmms-eval tasks, in ONE
process on ONE loaded model, through ``lmms_eval.evaluator.simple_evaluate(model=<instance>)``.

Writes to ``--out``:

* ``results.md`` / ``results.csv``: task, metric, method, budget, score, % of the baseline, visual tokens
  kept (mean per sample; in-LLM methods also show the per-layer average), prefill ms (mean per prefill call);
* ``samples.jsonl``: one line per (setting, document): question (the prompt), target, response, per-sample
  metrics, prefill ms, visual tokens before / after;
* ``results.json``: lmms-eval's aggregated results per setting, with the exact vtprune configuration;
* ``overlays/<setting>/<task>-<doc>.png`` with ``--save-overlays N``: the kept tokens of the first N documents
  of every task under each pruned setting (``vtprune report`` puts them beside the answers).

The offline synthetic VQA task (``synthetic_vqa``) is written under ``<out>/tasks`` on the fly. Offline
environment variables are set before lmms-eval / datasets are imported (``--online`` to skip), and the
datasets cache goes to ``<out>/hf_home`` unless ``--hf-home`` or ``$HF_HOME`` says otherwise.

    vtprune eval --model models/synthetic-llava --tasks synthetic_vqa \\
        --methods random,kcenter,fastv:layer=2 --ratios 0.5,0.75,0.889 --limit 300
    vtprune eval --config eval/configs/gqa.yaml --model /path/llava-1.5-7b-hf --device cuda
    accelerate launch --num_processes 4 -m vtprune.eval_runner --config eval/configs/pope.yaml ...
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtprune.spec import parse as spec_parse
from vtprune.spec import parse_pairs, split_top

REPO = Path(__file__).resolve().parent.parent
#: Tasks shipped in this repository: name -> the task directory's utils.py (which can write a copy).
LOCAL_TASKS: dict[str, Path] = {"synthetic_vqa": REPO / "eval" / "tasks" / "synthetic_vqa" / "utils.py"}
DEFAULT_MODEL = "models/synthetic-llava"
DEFAULT_METHODS = ("random", "pool", "kcenter", "cls_attention", "fastv")
DEFAULT_RATIOS = (0.5, 0.75, 0.889)
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TABLE_COLUMNS = ("task", "metric", "method", "budget", "score", "% of baseline", "visual tokens kept",
                 "prefill ms")
CSV_COLUMNS = ("task", "metric", "method", "budget", "score", "stderr", "pct_of_baseline", "visual_kept",
               "visual_before", "mean_visual_per_layer", "prefill_ms", "select_ms", "n", "batch_size",
               "model", "model_class", "config")


@dataclass
class SweepSpec:
    """Everything one ``vtprune eval`` run does (CLI flags and ``--config`` YAML keys share these names)."""

    model: str = DEFAULT_MODEL
    model_class: str = "vtprune"
    model_args: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=lambda: ["synthetic_vqa"])
    methods: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    keeps: list[int] = field(default_factory=list)
    budget: str = "per_frame"
    positions: str = "original"
    newlines: str = "row"
    baseline: bool = True
    limit: int | float | None = None
    batch_size: int = 1
    device: str | None = None
    gen_kwargs: str | None = None
    metrics: list[str] = field(default_factory=list)
    include_paths: list[str] = field(default_factory=list)
    synthetic_n: int = 1000
    out: str = "out/eval"
    hf_home: str | None = None
    offline: bool = True
    seed: int = 0
    chat: bool = False
    save_overlays: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["methods"] = [{"method": n, **o} for n, o in self.methods]
        return d


# ============================================================================ parsing
def parse_method(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"fastv:layer=2:keep=64"`` or ``{"method": "fastv", "layer": 2, "keep": 64}`` -> the same
    ``("fastv", {"layer": 2, "keep": 64})`` (:mod:`vtprune.spec`)."""
    return spec_parse(spec)


def _numbers(text: str | Sequence[Any] | None, cast: type) -> list[Any]:
    if text is None:
        return []
    items = split_top(text, ",") if isinstance(text, str) else list(text)
    return [cast(x) for x in items]


def _model_args(value: str | dict[str, Any] | None) -> dict[str, Any]:
    if not value:
        return {}
    return dict(value) if isinstance(value, dict) else parse_pairs(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``vtprune eval`` options (every one also a key of a ``--config`` YAML, dashes as underscores)."""
    p = argparse.ArgumentParser(prog="vtprune eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="a sweep YAML (eval/configs/*.yaml); flags given here override its keys")
    a("--model", help=f"model directory (with its processor) or hub id (default: {DEFAULT_MODEL})")
    a("--model-class", help="vtprune (generic, default), vtprune_llava_hf, vtprune_qwen2_vl, "
                            "vtprune_qwen2_5_vl, vtprune_qwen3_vl, vtprune_internvl_hf")
    a("--model-args", help="extra constructor args, k=v,k=v (e.g. attn_implementation=sdpa,device_map=auto)")
    a("--chat", action="store_true", default=None,
      help="use the chat variant of a wrapped class where one exists")
    a("--tasks", help="comma-separated lmms-eval task names (default: synthetic_vqa)")
    a("--include-path", action="append", dest="include_paths",
      help="extra lmms-eval task directory (repeatable)")
    a("--methods", help="comma-separated method specs name[:key=value...], e.g. "
                        f"kcenter,fastv:layer=3,mmr:lam=0.5 (default: {','.join(DEFAULT_METHODS)})")
    a("--ratios", help=f"comma-separated fractions of visual tokens REMOVED (default: {DEFAULT_RATIOS} "
                       "unless --keeps is given)")
    a("--keeps", help="comma-separated visual tokens kept per span, e.g. 192,128,64")
    a("--budget", help="span policy: per_frame (default), per_image, global, temporal")
    a("--positions", help="original (default) or compact")
    a("--newlines", help="AnyRes newlines: row (default: kept with their canvas row) or all (the vLLM plugin's)")
    a("--no-baseline", dest="baseline", action="store_false", default=None, help="skip the unpruned run")
    a("--limit", type=float, help="documents per task (an integer), or a fraction if < 1")
    a("--batch-size", type=int, help="prompts per generate call (default 1; lmms-eval's llava_hf needs 1)")
    a("--device", help="cpu / cuda / cuda:N (default: cuda if available)")
    a("--gen-kwargs", help="lmms-eval generation overrides, e.g. max_new_tokens=16")
    a("--metrics", help="comma-separated metrics to tabulate (default: every numeric metric of each task)")
    a("--synthetic-n", type=int, help="samples written for synthetic_vqa (default 1000)")
    a("--out", help="output directory (default out/eval)")
    a("--hf-home", help="HF_HOME for the datasets cache (default: $HF_HOME, else <out>/hf_home)")
    a("--online", dest="offline", action="store_false", default=None,
      help="do not set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE")
    a("--seed", type=int, help="lmms-eval's random seeds (default 0)")
    a("--save-overlays", type=int, metavar="N",
      help="draw the kept tokens of the first N documents of every task under each pruned setting into "
           "<out>/overlays/ (samples.jsonl's overlay names the PNG; vtprune report shows them)")
    return p


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """Defaults < ``--config`` YAML < explicit flags."""
    raw: dict[str, Any] = {}
    if args.config:
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: a sweep config is a mapping of option: value")
        raw.update({k.replace("-", "_"): v for k, v in loaded.items()})
    raw.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    known = set(SweepSpec.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown sweep option(s) {unknown}; allowed: {sorted(known)}")
    spec = SweepSpec()
    for key, value in raw.items():
        if key == "methods":
            items = split_top(value, ",") if isinstance(value, str) else list(value)
            value = [parse_method(m) for m in items]
        elif key in ("tasks", "metrics"):
            value = split_top(value, ",") if isinstance(value, str) else [str(t) for t in value]
        elif key == "ratios":
            value = _numbers(value, float)
        elif key == "keeps":
            value = _numbers(value, int)
        elif key == "model_args":
            value = _model_args(value)
        elif key == "include_paths":
            value = [str(v) for v in ([value] if isinstance(value, str) else value)]
        elif key == "limit" and value is not None:
            value = int(value) if float(value) >= 1 else float(value)
        elif key == "gen_kwargs" and isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        setattr(spec, key, value)
    if not spec.methods and "methods" not in raw:
        spec.methods = [(m, {}) for m in DEFAULT_METHODS]
    if not spec.ratios and not spec.keeps and "ratios" not in raw and "keeps" not in raw:
        spec.ratios = list(DEFAULT_RATIOS)
    return spec


# ============================================================================ running
def settings_of(spec: SweepSpec) -> list[Any]:
    """The :class:`PruneConfig` of every run: baseline first, then each method x budget (validated)."""
    from vtprune.integrations.model_args import PruneConfig, parse_model_args

    out = [PruneConfig(None, spec.budget, spec.positions, spec.newlines)] if spec.baseline else []
    for name, opts in spec.methods:
        own = "ratio" in opts or "keep" in opts
        budgets = [{}] if own else [{"ratio": r} for r in spec.ratios] + [{"keep": k} for k in spec.keeps]
        if not budgets:
            raise ValueError(f"method {name!r} has no budget: give --ratios / --keeps, or ratio= / keep= "
                             "in its spec")
        for b in budgets:
            args = {"method": name, "budget": spec.budget, "positions": spec.positions, "newlines": spec.newlines,
                    **opts, **b}
            out.append(parse_model_args(args, allowed=(), owner=f"--methods {name}")[0])
    if not out:
        raise ValueError("nothing to run: no baseline and no methods")
    return out


def prepare_environment(spec: SweepSpec) -> Path:
    """Offline variables, OMP policy and HF_HOME, set before lmms-eval / datasets are imported (they read
    some of them at import time). Returns HF_HOME."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if spec.offline:
        for var in OFFLINE_VARS:
            os.environ[var] = "1"
    hf_home = Path(spec.hf_home or os.environ.get("HF_HOME") or Path(spec.out) / "hf_home")
    hf_home = hf_home.expanduser().resolve()
    hf_home.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HOME"] = str(hf_home)
    return hf_home


def prepare_tasks(spec: SweepSpec) -> tuple[list[str], bool]:
    """Write the local tasks the sweep needs under ``<out>/tasks``; returns (include paths, whether
    lmms-eval's built-in tasks are needed too)."""
    paths = [str(Path(p).resolve()) for p in spec.include_paths]
    local = [t for t in spec.tasks if t in LOCAL_TASKS]
    if local:
        dest = Path(spec.out).resolve() / "tasks"
        for task in local:
            if not LOCAL_TASKS[task].exists():
                raise ValueError(f"task {task!r} ships in the repository ({LOCAL_TASKS[task].parent}), which "
                                 "this installation does not include; run from a checkout")
            module = _load_file(LOCAL_TASKS[task], f"_vtprune_task_{task}")
            n = spec.synthetic_n
            if spec.limit is not None and spec.limit >= 1:  # write only what will be read
                n = min(n, int(spec.limit))
            module.write_task(dest, n=n)
        paths.append(str(dest))
    return paths, any(t not in LOCAL_TASKS for t in spec.tasks)


def _load_file(path: Path, name: str) -> Any:
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def _gather(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' per-sample records (data-parallel runs under ``accelerate launch``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        return [r for part in parts for r in part]
    return records


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _metrics(task_result: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """``{"exact_match": (value, stderr)}`` from one task's lmms-eval result (first filter of each metric)."""
    out: dict[str, tuple[float, float | None]] = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr" in key:
            continue
        metric, filt = key.split(",", 1)
        if metric in out or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        err = task_result.get(f"{metric}_stderr,{filt}")
        numeric = isinstance(err, (int, float)) and not isinstance(err, bool)
        out[metric] = (float(value), float(err) if numeric else None)
    return out


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def _json_default(o: Any) -> Any:
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def _response(sample: dict[str, Any]) -> Any:
    resp = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(resp, list) and len(resp) == 1:
        resp = resp[0]
    return resp


def run(spec: SweepSpec) -> list[dict[str, Any]]:
    """Run the sweep; returns the table rows (on the main process; [] elsewhere)."""
    from tqdm.auto import tqdm

    prepare_environment(spec)
    include_paths, need_builtin = prepare_tasks(spec)
    settings = settings_of(spec)  # validate every setting before loading anything

    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from vtprune.integrations.lmms_eval import model_class

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    cls = model_class(spec.model_class, chat=spec.chat)
    ctor: dict[str, Any] = {"pretrained": spec.model, "batch_size": spec.batch_size, **spec.model_args}
    if spec.device:
        ctor["device"] = spec.device
    elif spec.model_class != "vtprune":  # lmms-eval's classes default to cuda
        import torch

        ctor["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()
    lm = cls(**ctor)
    for cfg in (settings[1:] if spec.baseline else settings):  # model-dependent checks (layer range, stages)
        lm.configure(cfg)
    task_manager = TaskManager("WARNING", include_path=include_paths or None, include_defaults=need_builtin)

    common = {"task_manager": task_manager, "batch_size": spec.batch_size, "gen_kwargs": spec.gen_kwargs,
              "verbosity": "WARNING", "random_seed": spec.seed, "numpy_random_seed": spec.seed,
              "torch_random_seed": spec.seed, "fewshot_random_seed": spec.seed, "bootstrap_iters": 1000}
    # Warm-up (one batch, discarded): the first prefill pays one-off costs that would bias the first setting.
    lm.configure(settings[0])
    evaluator.simple_evaluate(model=lm, tasks=list(spec.tasks[:1]), limit=spec.batch_size, log_samples=False,
                              **common)

    rows: list[dict[str, Any]] = []
    samples_path, main = out / "samples.jsonl", _is_main()
    if main:
        samples_path.write_text("")
    raw_results: list[dict[str, Any]] = []
    baseline: dict[tuple[str, str], float] = {}
    lm.save_overlays(out if main else None, spec.save_overlays)
    bar = tqdm(settings, desc="settings", unit="setting", disable=not main)
    for cfg in bar:
        bar.set_postfix_str(cfg.label)
        lm.configure(cfg)
        res = evaluator.simple_evaluate(model=lm, tasks=list(spec.tasks), limit=spec.limit, log_samples=True,
                                        **common)
        records = _gather(lm.sample_records())
        if not main or res is None:
            continue
        raw_results.append({"setting": cfg.label, "config": cfg.to_dict(), "results": res.get("results", {}),
                            "n-samples": res.get("n-samples", {})})
        with samples_path.open("a") as f:
            for task, task_samples in (res.get("samples") or {}).items():
                task_records = [r for r in records if r["task"] == task]
                metrics = _metrics(res["results"].get(task, {}))
                shown = {m: v for m, v in metrics.items() if not spec.metrics or m in spec.metrics}
                if cfg.method is None:
                    baseline.update({(task, m): score for m, (score, _) in metrics.items()})
                rows += _table_rows(spec, cfg, task, shown, len(task_samples), task_records, baseline)
                for line in _sample_lines(cfg, task, task_samples, list(metrics), task_records):
                    f.write(json.dumps(line, default=_json_default) + "\n")
        write_tables(rows, out)  # after every setting: a crash keeps what finished
        (out / "results.json").write_text(json.dumps(
            {"spec": spec.to_dict(), "settings": raw_results, "wall_s": time.perf_counter() - t_start},
            indent=1, default=_json_default))
    lm.configure(None)
    if main:
        print(markdown_table(rows))
        print(f"\nwrote {out / 'results.md'}, {out / 'results.csv'}, {samples_path} "
              f"({time.perf_counter() - t_start:.1f} s)")
    return rows


def _table_rows(spec: SweepSpec, cfg: Any, task: str, metrics: dict[str, tuple[float, float | None]], n: int,
                records: list[dict[str, Any]], baseline: dict[tuple[str, str], float],
                ) -> list[dict[str, Any]]:
    """One table row per metric of ``task`` under setting ``cfg``; tokens and times are per-sample means."""
    def mean_of(key: str) -> float:
        return _mean([r[key] for r in records])

    rows = []
    for metric, (score, err) in metrics.items():
        base = baseline.get((task, metric))
        rows.append({
            "task": task, "metric": metric, "method": cfg.method_label, "budget": cfg.budget_label,
            "score": score, "stderr": err, "pct_of_baseline": 100.0 * score / base if base else math.nan,
            "visual_kept": mean_of("visual_after"), "visual_before": mean_of("visual_before"),
            "mean_visual_per_layer": mean_of("mean_visual_per_layer"), "prefill_ms": mean_of("prefill_ms"),
            "select_ms": mean_of("select_ms"), "n": n, "batch_size": spec.batch_size, "model": spec.model,
            "model_class": spec.model_class, "config": json.dumps(cfg.to_dict(), default=_json_default),
        })
    return rows


_RECORD_KEYS = ("prefill_ms", "batch_rows", "prompt_tokens", "visual_before", "visual_after",
                "mean_visual_per_layer", "select_ms", "overlay")


_QUESTION_CHARS = 4000  # a long context (few-shot, OCR dumps) would bloat samples.jsonl: keep its head


def _question(sample: dict[str, Any]) -> str | None:
    """The prompt text lmms-eval logged for a document: the first string among the request's ``arguments``
    (generate_until's context; its other strings, the task and split names, come later)."""
    args = sample.get("arguments")
    # one request per document: a flat list; older lmms-eval logged a list of argument tuples
    while isinstance(args, (list, tuple)) and args and isinstance(args[0], (list, tuple)):
        args = args[0]
    text = next((a for a in args if isinstance(a, str)), None) if isinstance(args, (list, tuple)) else None
    if text is None:
        return None
    return text if len(text) <= _QUESTION_CHARS else text[:_QUESTION_CHARS] + " [...]"


def _sample_lines(cfg: Any, task: str, samples: list[dict[str, Any]], metric_names: list[str],
                  records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``samples.jsonl`` lines: lmms-eval's per-document log joined with the model's prefill records."""
    by_doc = {r["doc_id"]: r for r in records if r["doc_id"] is not None}
    for s in samples:
        rec = by_doc.get(s.get("doc_id"), {})
        yield {"setting": cfg.label, "method": cfg.method_label, "budget": cfg.budget_label, "task": task,
               "doc_id": s.get("doc_id"), "question": _question(s), "target": s.get("target"),
               "response": _response(s),
               **{m: s.get(m) for m in metric_names}, **{k: rec.get(k) for k in _RECORD_KEYS}}


# ============================================================================ tables
def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results table: one row per (setting, task, metric)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        kept = f"{_fmt(r['visual_kept'])} / {_fmt(r['visual_before'])}"
        if abs(r["mean_visual_per_layer"] - r["visual_kept"]) > 0.5:  # in-LLM pruning: FastV's average budget
            kept += f" ({_fmt(r['mean_visual_per_layer'])} avg/layer)"
        score = _fmt(r["score"], 4) + (f" ± {r['stderr']:.4f}" if r.get("stderr") else "")
        lines.append("| " + " | ".join([r["task"], r["metric"], r["method"], r["budget"], score,
                                        _fmt(r["pct_of_baseline"]), kept, _fmt(r["prefill_ms"])]) + " |")
    return "\n".join(lines)


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    """``results.md`` and ``results.csv`` under ``out``."""
    (out / "results.md").write_text(markdown_table(rows) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS})


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vtprune eval`` (and ``python -m vtprune.eval_runner``)."""
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("lmms_eval") is None:
        print("vtprune eval: error: lmms-eval is not installed; run scripts/setup_lmms_eval.sh .venv "
              '(CPU, keeps torch) or pip install -e ".[eval]"', file=sys.stderr)
        return 2
    try:
        spec = spec_from_args(args)
        if spec.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).exists():
            raise ValueError(f"no --model given and {DEFAULT_MODEL} does not exist (train it with "
                             "scripts/train_synthetic.py, or pass a model directory)")
        prepare_environment(spec)  # before settings_of(), which imports lmms-eval
        settings_of(spec)  # bad methods / options fail here, before a model is loaded
    except ValueError as exc:
        print(f"vtprune eval: error: {exc}", file=sys.stderr)
        return 2
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
