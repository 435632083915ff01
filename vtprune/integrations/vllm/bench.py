"""``vtprune bench --host vllm``: throughput and time to first token of vLLM with the plugin.

Models: the trained synthetic LLaVA (``synthetic``) and the width-faithful LLaVA-1.5-7B proxy (``llava-1.5-7b``:
CLIP ViT-L/14-336 + a Llama-2-7B-width LLM with few layers, random weights; :mod:`vtprune.bench.proxies`), which
is saved once as a local checkpoint in the llava-hf layout with the synthetic model's tokenizer and processor.

Each configuration is one engine (the plugin's configuration is fixed at engine start; prefix caching off): the
unpruned model at 576 tokens, ``random`` at each budget (selection costs nothing, so it is the speed of the token
count), and every method the plugin runs at the last budget. Per engine: a warm-up with a full batch, then ``reps``
timed batches of ``prompts`` requests (``max_tokens=1``: the prefill, which pruning shortens) and ``reps`` single
requests (time to first token); every request shows a different held-out image, the same ones in every engine.
Reported: prompts / s, median TTFT, both relative to the unpruned engine, each method's throughput relative to
``random`` at the same budget, and the same ratio from the selection time the worker measured per image
(``select ms``, from the plugin's ``record`` file): the engine runs the selection in line with the encoder and the
LLM, so a method serves a prompt in random's time plus its extra selection time, ``/random (cost)`` =
1 / (1 + extra seconds x random's prompts / s). On shared CPU cores the throughput ratio of two engines scatters
by tens of percent; the selection time does not.
"""

from __future__ import annotations

import csv
import gc
import statistics
import time
from pathlib import Path
from typing import Any

from vtprune.integrations.vllm import offline

MODELS = ("synthetic", "llava-1.5-7b")


def proxy_checkpoint(name: str, root: str | Path = "out/vllm-proxies") -> Path:
    """The proxy ``name`` saved for vLLM (once): safetensors in the llava-hf layout, the synthetic tokenizer."""
    import json
    import shutil

    from vtprune.bench.accuracy import DEFAULT_MODEL
    from vtprune.bench.proxies import build_proxy
    from vtprune.synthetic.model import canonical_llava_layout

    path = Path(root) / name
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path
    model = build_proxy(name)
    src = DEFAULT_MODEL
    tok = json.loads((src / "config.json").read_text())
    model.config.image_token_index = tok["image_token_index"]  # the synthetic tokenizer's <image>
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config.text_config, key, tok["text_config"][key])
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    canonical_llava_layout(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, path / f)
    return path


def _timed(llm: Any, reqs: list[dict], prompts: int, reps: int) -> tuple[float, float, float]:
    """(prompts / s over timed batches, median single-request latency, mean prompt tokens). Every request shows a
    different image (vLLM's encoder cache would skip the vision tower and the selection for a repeated one) and
    prefix caching is off in the engine (a repeated prompt would skip its prefill)."""
    batches = [reqs[i * prompts:(i + 1) * prompts] for i in range(reps + 1)]
    singles = reqs[(reps + 1) * prompts:]
    offline.generate(llm, batches[0])  # warm-up with a full batch (a small one leaves the first timed batch slow)
    rates, ttft = [], []
    for r in range(reps):
        t0 = time.perf_counter()
        outs = offline.generate(llm, batches[r + 1])
        rates.append(prompts / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        offline.generate(llm, [singles[r]])
        ttft.append(time.perf_counter() - t0)
    return statistics.median(rates), statistics.median(ttft), statistics.mean(len(o.prompt_token_ids) for o in outs)


def run(models: list[str], methods: list[tuple[str, dict]], budgets: tuple[int, ...] = (192, 64), prompts: int = 32,
        reps: int = 3, out_dir: str | Path = "out") -> list[dict]:
    from transformers import AutoConfig, AutoTokenizer

    from vtprune.bench.accuracy import DEFAULT_MODEL
    from vtprune.integrations.vllm.config import PluginConfig, steps_for
    from vtprune.integrations.vllm.families import VllmLlava
    from vtprune.synthetic.scenes import heldout

    rows: list[dict] = []
    for name in models:
        if name not in MODELS:
            raise ValueError(f"bench --host vllm: unknown model {name!r}; allowed: {', '.join(MODELS)}")
        path = DEFAULT_MODEL if name == "synthetic" else proxy_checkpoint(name, Path(out_dir) / "vllm-proxies")
        tokenizer = AutoTokenizer.from_pretrained(path)
        reqs = offline.synthetic_requests(heldout(prompts * (reps + 1) + reps), tokenizer)
        adapter = VllmLlava(AutoConfig.from_pretrained(path))
        configs: list[tuple[str, dict | None]] = [("none", None)]
        configs += [(f"random@{b}", {"method": "random", "keep": b}) for b in budgets]
        last = budgets[-1]
        for m, opts in methods:
            if m == "random" and not opts:
                continue
            cfg = {"method": m, **opts, "keep": last}
            try:
                steps_for(PluginConfig.parse(cfg), adapter)
            except ValueError as exc:
                print(f"skipped {m}{opts or ''}: {exc}")
                continue
            configs.append((m + ("" if not opts else "(" + ",".join(f"{k}={v}" for k, v in opts.items()) + ")")
                            + f"@{last}", cfg))
        results, select_ms = {}, {}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        log = (Path(out_dir) / "vllm-bench-kept.jsonl").resolve()  # the engine's workers may run elsewhere
        for label, cfg in configs:
            log.unlink(missing_ok=True)
            cfg = None if cfg is None else {**cfg, "record": str(log)}  # each image's selection time, in the worker
            llm = offline.engine(str(path), cfg, max_num_seqs=prompts, enable_prefix_caching=False)
            try:
                results[label] = _timed(llm, reqs, prompts, reps)
            finally:
                del llm
                gc.collect()
            timed = offline.read_selection_ms(log)[prompts:]  # after the warm-up batch
            select_ms[label] = statistics.mean(timed) if timed else 0.0
            rate, ttft, length = results[label]
            print(f"{name} {label:<28} {rate:7.2f} prompts/s  TTFT {1e3 * ttft:7.1f} ms  prompt {length:.0f} tokens"
                  f"  selection {select_ms[label]:.1f} ms / image")
        base = results["none"]
        for label, (rate, ttft, length) in results.items():
            budget = label.rsplit("@", 1)[1] if "@" in label else "576"
            ref = results.get(f"random@{budget}")
            # the engine runs the selection in line with everything else: a method adds its extra selection time
            # to every prompt random's engine serves at the same budget
            extra = (select_ms[label] - select_ms.get(f"random@{budget}", 0.0)) / 1e3
            rows.append({"model": name, "config": label, "prompt_tokens": length, "prompts_per_s": rate,
                         "ttft_ms": 1e3 * ttft, "speedup": rate / base[0], "ttft_speedup": base[1] / ttft,
                         "vs_random": rate / ref[0] if ref is not None else float("nan"),
                         "select_ms": select_ms[label],
                         "vs_random_cost": 1 / (1 + extra * ref[0]) if ref is not None else float("nan")})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_vllm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"\n{'model':<14}{'config':<30}{'tokens':>7}{'prompts/s':>11}{'x':>7}{'TTFT ms':>10}{'x':>7}{'/random':>9}"
          f"{'select ms':>11}{'/random (cost)':>16}")
    for r in rows:
        print(f"{r['model']:<14}{r['config']:<30}{r['prompt_tokens']:>7.0f}{r['prompts_per_s']:>11.2f}"
              f"{r['speedup']:>7.2f}{r['ttft_ms']:>10.1f}{r['ttft_speedup']:>7.2f}{r['vs_random']:>9.3f}"
              f"{r['select_ms']:>11.1f}{r['vs_random_cost']:>16.3f}")
    print(f"wrote {out / 'bench_vllm.csv'}")
    return rows
