"""Tensor parallelism: with ``tensor_parallel_size=2`` (one CPU core per worker) the plugin picks the same tokens
and gives the same answers as with one worker. visionzip reads the most: [CLS] attention and keys from a ViT
layer (q / k weights sharded across the workers, gathered once), the [CLS] state and the projector's parts."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv (scripts/setup_vllm.sh)")

from vtprune.bench.accuracy import DEFAULT_MODEL, load  # noqa: E402
from vtprune.integrations.vllm import offline  # noqa: E402
from vtprune.synthetic.scenes import heldout  # noqa: E402


@pytest.mark.parametrize("method", ["visionzip"])
def test_tp2_same_tokens_and_answers_as_tp1(method, tmp_path):
    _, processor = load(DEFAULT_MODEL)
    reqs = offline.synthetic_requests(heldout(24), processor.tokenizer)
    runs = {}
    for tp in (1, 2):
        log = tmp_path / f"kept{tp}.jsonl"
        llm = offline.engine(DEFAULT_MODEL, {"method": method, "keep": 64, "record": str(log)},
                             tensor_parallel_size=tp)
        outs = offline.generate(llm, reqs)
        runs[tp] = ([o.outputs[0].token_ids[0] for o in outs], [o.outputs[0].logprobs[0] for o in outs],
                    sorted((round(c, 3), tuple(k)) for c, k in offline.read_kept(log)))
        del llm
    assert runs[2][2] == runs[1][2], "TP=2 kept other tokens than TP=1"
    assert runs[2][0] == runs[1][0], "TP=2 answered differently from TP=1"
    for a, b, tok in zip(runs[1][1], runs[2][1], runs[1][0]):
        assert abs(a[tok].logprob - b[tok].logprob) < 1e-4
