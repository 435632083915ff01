"""``vtprune`` command line: ``vtprune demo``, ``show``, ``report``, ``eval``, ``video-qa``, ``methods``, ``models``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # its options live in vtprune/eval_runner.py (lmms-eval imported lazily)
        from vtprune.eval_runner import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["show"]:  # options in vtprune/show.py
        from vtprune.show import main as show_main

        return show_main(argv[1:])
    if argv[:1] == ["report"]:  # options in vtprune/report.py (reading: vtprune/report_runs.py)
        from vtprune.report import main as report_main

        return report_main(argv[1:])
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="accuracy retained, speed-up and efficiency of every method at 192 / 128 / 64 "
                                       "tokens on the embedded trained model")
    demo.add_argument("--model", default=None, help="model directory (default: the shipped models/synthetic-llava)")
    demo.add_argument("--samples", type=int, default=100, help="held-out questions per configuration")
    demo.add_argument("--reps", type=int, default=3, help="timed repetitions per configuration (median reported)")
    demo.add_argument("--out", default="out", help="directory for demo.csv and demo.png")
    demo.add_argument("--no-plot", action="store_true")
    cal = sub.add_parser("calibrate-entropy", help="measure the entropy-collapse layer of a model (EntropyPrune)")
    cal.add_argument("--model", required=True,
                     help="a local model directory (with its processor), or tiny:<family> for a random tiny model")
    cal.add_argument("--images", help="a folder of images (default: the offline synthetic VQA scenes)")
    cal.add_argument("--prompt", default="Describe the image.", help="question asked about every image")
    cal.add_argument("--samples", type=int, default=16)
    bench = sub.add_parser("bench", help="speed / memory / FLOPs on width-faithful proxies (vtprune/bench/speed.py)")
    bench.add_argument("--proxy", nargs="+", default=["llava-1.5-7b", "qwen2-vl-7b"],
                       help="proxies: llava-1.5-7b, qwen2-vl-7b, tiny (CI smoke)")
    bench.add_argument("--methods", nargs="*", help="names or specs such as fastv:layer=2 (default: every method)")
    bench.add_argument("--budgets", nargs="+", type=int, default=[192, 128, 64])
    bench.add_argument("--reps", type=int, default=3, help="repetitions at least")
    bench.add_argument("--max-reps", type=int, default=None,
                       help="repeat up to this many times until the control's E is known to +-spread")
    bench.add_argument("--spread", type=float, default=0.01, help="target 95%% CI half-width of the control's E")
    bench.add_argument("--out", default="out")
    bench.add_argument("--selection", action="store_true",
                       help="only the selection cost vs the unpruned prefill, at 576 and 6336 visual tokens")
    bench.add_argument("--images", nargs="+", type=int, default=[1, 11], help="with --selection: images per prompt")
    bench.add_argument("--host", choices=["hf", "vllm"], default="hf",
                       help="vllm: throughput / time to first token of vLLM with vtprune's plugin (the vLLM venv); "
                            "--proxy then names synthetic and / or llava-1.5-7b")
    bench.add_argument("--prompts", type=int, default=32, help="with --host vllm: requests per timed batch")
    acc = sub.add_parser("accuracy", help="accuracy of every method x budget on the offline synthetic VQA benchmark")
    acc.add_argument("--model", default=None, help="model directory (default: the shipped models/synthetic-llava)")
    acc.add_argument("--samples", type=int, default=500)
    acc.add_argument("--methods", nargs="*", help="names or specs such as fastv:layer=2 (default: every method)")
    acc.add_argument("--budgets", nargs="+", type=int, default=[192, 128, 64, 32, 16])
    acc.add_argument("--seeds", type=int, default=3, help="seeds averaged for random")
    acc.add_argument("--out", default="out")
    acc.add_argument("--host", choices=["hf", "vllm"], default="hf",
                     help="transformers (every method) or vLLM with vtprune's plugin (its methods; the vLLM venv)")
    from vtprune.video_qa import add_arguments as video_qa_arguments

    video_qa_arguments(sub.add_parser("video-qa", help="answer, score and time a video question set (docs/video.md)"))
    sub.add_parser("eval", help="lmms-eval: unpruned baseline + method x budget sweeps in one run (eval/README.md)")
    sub.add_parser("show", help="one PNG: an image and, per method, the tokens it keeps and its answer")
    sub.add_parser("report", help="one self-contained HTML page of an evaluation output directory")
    sub.add_parser("methods", help="list the registered methods")
    sub.add_parser("models", help="list the supported model families")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from vtprune.bench.accuracy import DEFAULT_MODEL
        from vtprune.bench.demo import run

        run(args.model or DEFAULT_MODEL, n=args.samples, reps=args.reps, out_dir=args.out, plot=not args.no_plot)
    elif args.command == "bench":
        from vtprune.bench.speed import BENCH_METHODS, run as run_bench

        methods = _selected(BENCH_METHODS, args.methods)
        if args.host == "vllm":
            from vtprune.integrations.vllm.bench import run as run_vllm_bench

            models = [p for p in args.proxy if p != "qwen2-vl-7b"] if args.proxy != bench.get_default("proxy") \
                else ["synthetic", "llava-1.5-7b"]
            run_vllm_bench(models, methods, budgets=tuple(args.budgets), prompts=args.prompts, reps=args.reps,
                           out_dir=args.out)
            return 0
        if args.selection:
            from vtprune.bench.speed import selection

            for proxy in args.proxy:
                selection(proxy, images=tuple(args.images), reps=args.reps, methods=methods, out_dir=args.out)
            return 0
        run_bench(args.proxy, out_dir=args.out, reps=args.reps, methods=methods, budgets=tuple(args.budgets),
                  max_reps=args.max_reps, spread=args.spread)
    elif args.command == "accuracy":
        from vtprune.bench.accuracy import ACC_METHODS, DEFAULT_MODEL, run as run_accuracy

        methods = _selected(ACC_METHODS, args.methods)
        run_accuracy(args.model or DEFAULT_MODEL, n=args.samples, methods=methods, budgets=tuple(args.budgets),
                     random_seeds=args.seeds, out_dir=args.out, host=args.host)
    elif args.command == "video-qa":
        from vtprune.video_qa import run as run_video_qa

        run_video_qa(args)
    elif args.command == "calibrate-entropy":
        from vtprune.calibration import entropy_profile

        model, batches = _calibration_inputs(args)
        report = entropy_profile(model, batches)
        print(f"matrix entropy of the visual tokens entering each decoder layer ({report['samples']} samples):")
        for l, (g, t) in enumerate(zip(report["global"], report["per_token"])):
            drop = report["global"][l - 1] - g if l else 0.0
            print(f"  layer {l:>3}: global {g:.4f}  (drop {drop:+.4f})   per-token query entropy {t:.4f}")
        print(f"entropy-collapse layer: {report['layer'] - 1}; prune at its output: "
              f"vtprune.prune(model, 'entropy', layer={report['layer']}, ...)")
    elif args.command == "methods":
        from vtprune.registry import METHODS

        for name in METHODS.names():
            cls = METHODS.get(name)
            aliases = METHODS.aliases_of(name)
            print(f"{name:<16} stage={cls.stage:<7} {'aliases=' + ','.join(aliases) if aliases else ''}")
    elif args.command == "models":
        import vtprune

        print(json.dumps(vtprune.list_models(), indent=2))
    return 0


def _selected(table: list[tuple[str, dict]], specs: list[str] | None) -> list[tuple[str, dict]]:
    """The (name, options) rows a benchmark runs: the whole table, or per spec (vtprune.spec) its options, a bare
    name taking the table's rows of that method (their curated options) or its defaults."""
    if not specs:
        return list(table)
    from vtprune import spec

    out = []
    for text in specs:
        name, options = spec.parse(text)
        rows = [(n, o) for n, o in table if n == name] if not options else []
        out += rows or [(name, options)]
    return out


def _calibration_inputs(args: argparse.Namespace) -> tuple:
    """(model, batches) for ``calibrate-entropy``: a tiny random model, or a local checkpoint + processor
    over images from a folder or from the offline synthetic scene generator."""
    import torch

    if args.model.startswith("tiny:"):
        from vtprune.testing.tiny import Row, build, make_inputs

        model = build(args.model.split(":", 1)[1])
        return model, [make_inputs(model, [Row(seed=i)]) for i in range(args.samples)]
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    if args.images:
        from pathlib import Path

        files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        images = [Image.open(p).convert("RGB") for p in files[: args.samples]]
    else:
        from vtprune.synthetic.scenes import heldout  # the offline VQA scenes

        images = [s.image for s in heldout(args.samples)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batches = [dict(processor(images=[im], text=[text], return_tensors="pt")) for im in images]
    with torch.no_grad():
        return model, batches


if __name__ == "__main__":
    sys.exit(main())
