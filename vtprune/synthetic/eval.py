"""Accuracy of a VLM on synthetic VQA samples, through the processor and ``model.generate`` (so any pruning
installed on the model is exercised exactly as a user would run it)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from vtprune.synthetic.scenes import Sample
from vtprune.synthetic.tokenizer import prompt


@dataclass
class EvalResult:
    """Exact-match accuracy overall and per question type, with every prediction (in sample order)."""

    accuracy: float
    per_type: dict[str, float]
    n: int
    predictions: list[str] = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        return {"accuracy": self.accuracy, "per_type": self.per_type, "n": self.n}


@torch.inference_mode()
def predict(model: torch.nn.Module, processor, samples: Sequence[Sample], *, max_new_tokens: int = 1) -> list[str]:
    """Greedy answers (first generated word) for one batch, left padded like any decoder-only batch."""
    tok = processor.tokenizer
    if tok.padding_side != "left":
        raise ValueError("evaluate() needs a left-padding tokenizer (the answer must follow each row's prompt)")
    inputs = processor(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                       padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [words[0] if (words := text.split()) else "" for text in tok.batch_decode(new, skip_special_tokens=True)]


def evaluate(model: torch.nn.Module, processor, samples: Sequence[Sample], batch_size: int = 32,
             progress: bool = False) -> EvalResult:
    """Exact-match accuracy of ``model``'s greedy answers on ``samples`` (the model is used as given: call
    ``model.eval()`` first, and install any pruning before)."""
    if not samples:
        raise ValueError("evaluate() needs at least one sample")
    preds: list[str] = []
    batches = range(0, len(samples), batch_size)
    for i in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        preds += predict(model, processor, samples[i:i + batch_size])
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, p in zip(samples, preds):
        hits[s.qtype].append(p == s.answer)
    total = [h for v in hits.values() for h in v]
    return EvalResult(
        accuracy=sum(total) / len(total),
        per_type={k: sum(v) / len(v) for k, v in sorted(hits.items())},
        n=len(total), predictions=preds,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vtprune.synthetic.eval [MODEL_DIR] [--n 1000]``: held-out accuracy of a saved model, offline."""
    import argparse
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtprune.synthetic.scenes import heldout

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("model", nargs="?", default="models/synthetic-llava")
    p.add_argument("--n", type=int, default=1000, help="held-out samples (the first n of the held-out split)")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
    res = evaluate(model, processor, heldout(args.n, args.offset), batch_size=args.batch_size, progress=True)
    print(json.dumps(res.to_dict(), indent=1))


if __name__ == "__main__":
    main()
