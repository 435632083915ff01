"""vtprune's ``evs`` and ``vidcom2`` select exactly what vLLM's own video pruners select (vLLM 0.32,
``vllm/multimodal/video_prune/{evs,vidcom2}.py``, behind ``--video-pruning-method``): the same counts, and the same
tokens on the same tensor, in float32 and bfloat16, including exact ties, and inside a model (the video's LLM
input embeddings, which is what vLLM scores on Qwen2.5-VL). Runs in the vLLM environment
(scripts/setup_vllm.sh); skipped where vLLM is absent."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM's video pruners are compared in the vLLM venv (scripts/setup_vllm.sh)")

from vllm.multimodal.video_prune import evs as vllm_evs  # noqa: E402
from vllm.multimodal.video_prune import vidcom2 as vllm_vidcom2  # noqa: E402

import vtprune  # noqa: E402
from vtprune.budget import Budget  # noqa: E402
from vtprune.signals import Signals  # noqa: E402
from vtprune.testing.tiny import Row, build, make_inputs  # noqa: E402

VLLM = {"evs": vllm_evs, "vidcom2": vllm_vidcom2}


def ours(name: str, x: torch.Tensor, T: int, h: int, w: int, q: float) -> torch.Tensor:
    """vtprune's kept indices of one video x (T*h*w, D) in raster order at ratio q."""
    method = vtprune.method(name)
    n = T * h * w
    k = min(n, method.video_count(Budget(ratio=q), n, T))
    if k >= n:  # the engine keeps a span whole without asking the method
        return torch.arange(n)
    j = torch.arange(n)
    frame = j // (h * w)
    grid = torch.stack([frame, (j % (h * w)) // w, j % w], 1)
    sig = Signals.from_tensors(tokens=x[None], grid=grid[None], frame=frame[None], budget=Budget(ratio=q))
    return method.select(sig, k)[0]


def theirs(name: str, x: torch.Tensor, T: int, h: int, w: int, q: float, merge: int = 2) -> torch.Tensor:
    mask = VLLM[name].compute_retention_mask(x, (T, h * merge, w * merge), merge, q)
    assert int(mask.sum()) == VLLM[name].compute_retained_tokens_count(h * w, T, q)
    return mask.nonzero().squeeze(-1)


@pytest.mark.parametrize("name", ["evs", "vidcom2"])
@pytest.mark.parametrize("T,h,w", [(1, 4, 5), (2, 3, 4), (8, 4, 4), (16, 7, 7)])
@pytest.mark.parametrize("q", [0.1, 0.5, 0.7, 0.75, 0.8, 0.9])
def test_counts_equal_vllms(name, T, h, w, q):
    n = T * h * w
    assert min(n, vtprune.method(name).video_count(Budget(ratio=q), n, T)) == \
        VLLM[name].compute_retained_tokens_count(h * w, T, q)


@pytest.mark.parametrize("name", ["evs", "vidcom2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,h,w,D", [(1, 4, 5, 16), (2, 3, 4, 8), (8, 4, 4, 32), (16, 7, 7, 64), (4, 2, 3, 1)])
@pytest.mark.parametrize("q", [0.1, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_same_tokens_as_vllm(name, dtype, T, h, w, D, q, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T * h * w, D, generator=g)
    x[: h * w] += torch.randn(D, generator=g)  # frames that differ
    x = x.to(dtype)
    assert torch.equal(ours(name, x, T, h, w, q), theirs(name, x, T, h, w, q))


@pytest.mark.parametrize("name", ["evs", "vidcom2"])
def test_same_tokens_as_vllm_on_exact_ties(name):
    """A still video of one-hot patches: every later token scores exactly alike; the tie order is vLLM's."""
    T, h, w = 6, 2, 3
    x = torch.eye(h * w).repeat(T, 1)
    x[3 * h * w + 2] = 1.0  # one patch changes in frame 3
    for q in (0.5, 0.75):
        assert torch.equal(ours(name, x, T, h, w, q), theirs(name, x, T, h, w, q))


@pytest.mark.parametrize("name", ["evs", "vidcom2"])
def test_inside_a_model_the_kept_tokens_are_vllms(name):
    """Pruning a tiny Qwen2.5-VL's video: the tokens vtprune keeps are vLLM's function applied to the video's LLM
    input embeddings (the merger output vLLM scores), with vLLM's grid_thw and merge size."""
    model = build("qwen2_5_vl")
    inputs = make_inputs(model, [Row(before=3, after=2, seed=4, image_size=(56, 28), video_frames=8)])
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("embeds", kwargs["inputs_embeds"].clone())

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    q = 0.7
    with vtprune.prune(model, name, ratio=q) as h, torch.no_grad():
        model(**inputs)
        kept = set(h.stats.kept_positions[0].tolist())
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[:, 0]
    thw = inputs["video_grid_thw"][0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    mask = VLLM[name].compute_retention_mask(captured["embeds"][0, video], thw, merge, q)
    assert {int(p) for p in video if int(p) in kept} == set(video[mask].tolist())
