"""attention_rows: the streaming Triton kernels against the materialising torch twin.

Tolerance is flash-attention's rule: the kernel's error against the float32 reference may be at most twice
the error of a plain torch computation in the input dtype, plus 1e-6.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from vtprune.kernels import attention_rows, attention_rows_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(B: int, H: int, Hkv: int, Tq: int, L: int, d: int, dtype: torch.dtype, *, hf_layout: bool = False):
    if hf_layout:  # (B, T, H, d) projections transposed to (B, H, T, d): non-contiguous, as in HF models
        q = torch.randn(B, Tq, H, d, device=DEVICE).to(dtype).transpose(1, 2)
        k = torch.randn(B, L, Hkv, d, device=DEVICE).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, Tq, d, device=DEVICE).to(dtype)
        k = torch.randn(B, Hkv, L, d, device=DEVICE).to(dtype)
    key_valid = torch.rand(B, L, device=DEVICE) > 0.2
    return q, k, key_valid


def assert_within_rule(out: torch.Tensor, q, k, **kw) -> None:
    ref = attention_rows_ref(q, k, **kw)  # float32
    plain = attention_rows_ref(q, k, upcast=False, **kw).float()  # the same math in the input dtype
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err, bound = (out - ref).abs().max().item(), 2 * (plain - ref).abs().max().item() + 1e-6
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["mean", "none"])
@pytest.mark.parametrize("B,H,Hkv,Tq,L,d", [(1, 2, 2, 1, 16, 16), (2, 4, 2, 5, 37, 24), (1, 4, 1, 3, 77, 80)])
def test_matches_ref(B, H, Hkv, Tq, L, d, reduce, dtype):
    q, k, key_valid = inputs(B, H, Hkv, Tq, L, d, dtype)
    kw = dict(scale=d**-0.5, key_valid=key_valid, reduce=reduce)
    assert_within_rule(attention_rows(q, k, backend="triton", **kw), q, k, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,weighted", [(True, False), (False, True), (True, True)])
def test_causal_and_weighted_queries(causal, weighted, dtype):
    B, H, Hkv, Tq, L, d = 2, 4, 2, 6, 37, 32
    q, k, key_valid = inputs(B, H, Hkv, Tq, L, d, dtype, hf_layout=True)
    query_pos = torch.randint(0, L, (B, Tq), device=DEVICE) if causal else None
    weight = None
    if weighted:
        weight = torch.rand(B, Tq, device=DEVICE)
        weight[0, :3] = 0  # ignored rows
    for reduce in ("mean", "none"):
        kw = dict(scale=d**-0.5, key_valid=key_valid, query_pos=query_pos, query_weight=weight, reduce=reduce)
        assert_within_rule(attention_rows(q, k, backend="triton", **kw), q, k, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_online_softmax_over_many_blocks(dtype):
    """Key and query tiles of 16: the running max / normaliser must carry across key blocks."""
    from vtprune.kernels.attention_rows_triton import attention_rows_triton

    B, H, Hkv, Tq, L, d = 2, 4, 2, 20, 77, 40
    q, k, key_valid = inputs(B, H, Hkv, Tq, L, d, dtype)
    k[:, :, 70:] *= 4  # large logits in the last block: a wrong rescale of earlier blocks shows
    key_valid[1, :40] = False  # whole leading blocks invisible for one row
    query_pos = torch.randint(20, L, (B, Tq), device=DEVICE)
    for reduce in ("mean", "none"):
        kw = dict(scale=d**-0.5, key_valid=key_valid, query_pos=query_pos, reduce=reduce)
        assert_within_rule(attention_rows_triton(q, k, block_t=16, block_l=16, **kw), q, k, **kw)


def test_semantics_and_edge_rows():
    """Probabilities sum to 1 over visible keys; rows with no visible key or zero weight add nothing."""
    B, H, Hkv, Tq, L, d = 2, 4, 2, 4, 37, 16
    q, k, key_valid = inputs(B, H, Hkv, Tq, L, d, torch.float32)
    key_valid[1] = False  # batch row 1: no visible key at all
    query_pos = torch.tensor([[-1, 5, 10, 36], [3, 3, 3, 3]], device=DEVICE)  # query 0 of row 0 sees nothing
    weight = torch.tensor([[5.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], device=DEVICE)
    kw = dict(scale=d**-0.5, key_valid=key_valid, query_pos=query_pos, query_weight=weight)
    out = attention_rows(q, k, backend="triton", reduce="none", **kw)  # (B, H, L)
    assert torch.allclose(out, attention_rows_ref(q, k, reduce="none", **kw), atol=1e-6)
    # row 0: weights normalise to 5/7, 1/7, 0, 1/7; the first query sees nothing -> mass 2/7 in total
    assert torch.allclose(out[0].sum(-1), torch.full((H,), 2 / 7, device=DEVICE), atol=1e-6)
    assert not out[0, :, 11:36][:, ~key_valid[0, 11:36]].any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # all weights zero, or no query rows at all -> zeros, never NaN
    zero_w = attention_rows(q, k, backend="triton", scale=1.0, key_valid=key_valid,
                            query_weight=torch.zeros(B, Tq))
    assert torch.equal(zero_w, torch.zeros(B, L))
    empty = attention_rows(q[:, :, :0], k, backend="triton", scale=1.0, key_valid=key_valid)
    assert torch.equal(empty, torch.zeros(B, L))


def test_gqa_head_mapping():
    """Query head h reads kv head h // (H // Hkv): repeating the kv heads must give the same result."""
    B, H, Hkv, Tq, L, d = 1, 4, 2, 3, 37, 16
    q, k, key_valid = inputs(B, H, Hkv, Tq, L, d, torch.float32)
    kw = dict(scale=0.3, key_valid=key_valid, reduce="none")
    gqa = attention_rows(q, k, backend="triton", **kw)
    mha = attention_rows(q, k.repeat_interleave(2, dim=1), backend="triton", **kw)
    assert torch.allclose(gqa, mha, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_rows(q[:, :3], k, backend="triton", **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (compiled path)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_on_gpu(dtype):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    B, H, Hkv, Tq, L, d = 2, 32, 8, 40, 620, 128
    q, k, key_valid = inputs(B, H, Hkv, Tq, L, d, dtype, hf_layout=True)
    query_pos = torch.randint(576, L, (B, Tq), device=DEVICE)
    for reduce in ("mean", "none"):
        kw = dict(scale=d**-0.5, key_valid=key_valid, query_pos=query_pos, reduce=reduce)
        assert_within_rule(attention_rows(q, k, **kw), q, k, **kw)
