"""Offline use of the plugin: an engine on a local checkpoint, the synthetic benchmark's requests, greedy
answers, and the kept indices every worker chose (for comparing with the Hugging Face host).

Scripts that create an engine need an ``if __name__ == "__main__":`` guard (vLLM's CPU platform spawns its
engine and worker processes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

#: vLLM settings for this machine's CPU build; callers may override any of them
ENGINE_DEFAULTS: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024,
                                   "max_num_seqs": 64, "seed": 0}


_SET_BY_US: set[str] = set()


def cpu_environment(tensor_parallel: int = 1) -> None:
    """Environment vLLM's CPU build needs here (set before the first engine starts): a small KV cache, and for
    tensor parallelism one core per worker (the default binding asks for NUMA nodes this machine lacks)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if tensor_parallel > 1:
        cores = os.cpu_count() or 1
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % cores) for i in range(tensor_parallel))
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        _SET_BY_US.update(("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"))
    else:  # a later single-worker engine must not inherit a multi-worker binding set here
        for key in list(_SET_BY_US):
            os.environ.pop(key, None)
            _SET_BY_US.discard(key)


def engine(model_dir: str, config: dict[str, Any] | None, **kwargs: Any) -> Any:
    """A ``vllm.LLM`` on ``model_dir`` with ``additional_config={"vtprune": config}`` (None: unpruned)."""
    cpu_environment(int(kwargs.get("tensor_parallel_size", 1)))
    from vllm import LLM

    return LLM(str(model_dir), additional_config={"vtprune": config} if config is not None else {},
               **{**ENGINE_DEFAULTS, **kwargs})


def synthetic_requests(samples: Sequence[Any], tokenizer: Any) -> list[dict[str, Any]]:
    """One request per synthetic sample: the prompt's token ids exactly as the Hugging Face processor makes them
    (one ``<image>`` token, which vLLM expands), and the image."""
    from vtprune.synthetic.tokenizer import prompt

    return [{"prompt_token_ids": tokenizer(prompt(s.question))["input_ids"], "multi_modal_data": {"image": s.image}}
            for s in samples]


def generate(llm: Any, requests: Sequence[dict[str, Any]], max_tokens: int = 1, logprobs: int = 0) -> list[Any]:
    """Greedy outputs (with the chosen tokens' log-probabilities and the top ``logprobs`` others), in request order."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs)
    return llm.generate(list(requests), params, use_tqdm=False)


def first_words(outputs: Sequence[Any]) -> list[str]:
    return [words[0] if (words := o.outputs[0].text.split()) else "" for o in outputs]


def read_kept(path: str | os.PathLike, tokens: bool = False) -> list[tuple]:
    """(pixel checksum, kept indices[, unpruned tokens]) of every image an engine configured with
    ``"record": path`` encoded, in encoding order. The checksum is of the pixels the model received (vLLM may
    normalise them on the device, so it identifies an image within one host)."""
    import json

    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["checksum"], r["kept"], r["tokens"]) if tokens else (r["checksum"], r["kept"]) for r in rows]


def read_selection_ms(path: str | os.PathLike) -> list[float]:
    """Selection time (ms) of every image an engine configured with ``"record": path`` encoded, in encoding order
    (an encoder call's time shared evenly by its images)."""
    import json

    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [float(json.loads(line)["select_ms"]) for line in f if line.strip()]
