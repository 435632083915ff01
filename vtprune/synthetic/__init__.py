"""Offline synthetic VQA: a procedural scene/question generator, a tokenizer and processor built in code, the
LLaVA-architecture model trained on it (shipped in ``models/synthetic-llava``) and an accuracy evaluator.

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from vtprune.synthetic import heldout, evaluate

    model = LlavaForConditionalGeneration.from_pretrained("models/synthetic-llava").eval()
    processor = AutoProcessor.from_pretrained("models/synthetic-llava")
    print(evaluate(model, processor, heldout(1000)).accuracy)

The generator (``scenes``) needs only numpy and PIL; names below load lazily, so importing this package imports
neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Sample": "vtprune.synthetic.scenes",
    "SceneObject": "vtprune.synthetic.scenes",
    "make_sample": "vtprune.synthetic.scenes",
    "iter_samples": "vtprune.synthetic.scenes",
    "heldout": "vtprune.synthetic.scenes",
    "QUESTION_TYPES": "vtprune.synthetic.scenes",
    "build_tokenizer": "vtprune.synthetic.tokenizer",
    "build_processor": "vtprune.synthetic.tokenizer",
    "prompt": "vtprune.synthetic.tokenizer",
    "ModelSpec": "vtprune.synthetic.model",
    "build_model": "vtprune.synthetic.model",
    "evaluate": "vtprune.synthetic.eval",
    "EvalResult": "vtprune.synthetic.eval",
}

if TYPE_CHECKING:
    from vtprune.synthetic.eval import EvalResult, evaluate
    from vtprune.synthetic.model import ModelSpec, build_model
    from vtprune.synthetic.scenes import QUESTION_TYPES, Sample, SceneObject, heldout, iter_samples, make_sample
    from vtprune.synthetic.tokenizer import build_processor, build_tokenizer, prompt

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vtprune.synthetic' has no attribute {name!r}")
