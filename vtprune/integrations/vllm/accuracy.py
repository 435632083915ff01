"""``vtprune accuracy --host vllm``: the synthetic benchmark's accuracy table through vLLM with the plugin.

The same held-out questions, methods and budgets as the Hugging Face table (:mod:`vtprune.bench.accuracy`), one
engine per configuration (the plugin's configuration is fixed at engine start). Methods vLLM cannot run (in-LLM
stages, methods reading the prompt's text) are listed as skipped with the reason. Needs the vLLM environment
(scripts/setup_vllm.sh).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from vtprune.integrations.vllm import offline


def _accuracy(outputs: list[Any], samples: list[Any]) -> tuple[float, dict[str, float]]:
    preds = offline.first_words(outputs)
    per: dict[str, list[bool]] = {}
    for s, p in zip(samples, preds):
        per.setdefault(s.qtype, []).append(p == s.answer)
    hits = [h for v in per.values() for h in v]
    return sum(hits) / len(hits), {k: sum(v) / len(v) for k, v in sorted(per.items())}


def cells(model_dir: str | Path, samples: list[Any], configs: list[tuple[str, dict, int]], random_seeds: int,
          tokenizer: Any) -> tuple[dict, list[dict], list[str]]:
    """(unpruned row, one row per runnable configuration, skip notes). Each row carries accuracy, per-type accuracy
    and the kept tokens per image."""
    from transformers import AutoConfig

    from vtprune.integrations.vllm.config import PluginConfig, steps_for
    from vtprune.integrations.vllm.families import VllmLlava

    adapter = VllmLlava(AutoConfig.from_pretrained(model_dir))
    reqs = offline.synthetic_requests(samples, tokenizer)

    def run(config: dict | None) -> tuple[float, dict[str, float], float]:
        llm = offline.engine(str(model_dir), config)
        try:
            outs = offline.generate(llm, reqs)
        finally:
            del llm
            gc.collect()
        acc, per = _accuracy(outs, samples)
        return acc, per, sum(len(o.prompt_token_ids) for o in outs) / len(outs)

    base_acc, base_per, base_len = run(None)
    base = {"accuracy": base_acc, "per_type": base_per, "prompt": base_len}
    rows, skipped = [], []
    for name, options, budget in configs:
        variants = [{"seed": s} for s in range(random_seeds)] if name == "random" else [{}]
        config = {"method": name, **options, "keep": budget}
        try:
            steps_for(PluginConfig.parse(config), adapter)
        except ValueError as exc:
            note = f"{name}{options or ''}: {exc}"
            if note not in skipped:
                skipped.append(note)
            continue
        accs, pers, lens = [], [], []
        for v in variants:
            acc, per, length = run({**config, **v})
            accs.append(acc)
            pers.append(per)
            lens.append(length)
        text = base_len - adapter.num_tokens(0, 0)  # prompt tokens that are not the image's
        rows.append({"name": name, "options": options, "budget": budget, "accs": accs, "per": pers,
                     "kept": sum(lens) / len(lens) - text})
    return base, rows, skipped
