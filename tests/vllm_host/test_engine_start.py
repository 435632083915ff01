"""A bad ``vtprune`` entry stops vLLM at engine start with vtprune's own message (before any engine process);
without the entry the model is vLLM's own, unpruned."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv (scripts/setup_vllm.sh)")

from vtprune.bench.accuracy import DEFAULT_MODEL  # noqa: E402
from vtprune.integrations.vllm import offline  # noqa: E402


@pytest.mark.parametrize(("config", "message"), [
    ({"method": "nope", "keep": 64}, "nope"),
    ({"method": "fastv", "keep": 64}, "inside the LLM"),
    ({"method": "coverage", "keep": 64}, "prompt's text"),
    ({"method": "kcenter", "keep": 64, "budget": "temporal"}, "before the encoder runs"),
    ({"method": "kcenter", "keep": -3}, "keep"),
    ({"method": "kcenter"}, "has no budget"),
])
def test_bad_config_fails_at_engine_start(config, message):
    with pytest.raises(Exception, match=message):
        offline.engine(DEFAULT_MODEL, config)


def test_without_the_entry_nothing_changes(tmp_path):
    from transformers import AutoTokenizer

    from vtprune.synthetic.scenes import heldout

    reqs = offline.synthetic_requests(heldout(2), AutoTokenizer.from_pretrained(DEFAULT_MODEL))
    llm = offline.engine(DEFAULT_MODEL, None)
    outs = offline.generate(llm, reqs)
    assert all(len(o.prompt_token_ids) > 576 for o in outs)  # every image token reached the LLM
    del llm
