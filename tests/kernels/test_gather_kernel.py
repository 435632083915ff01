"""gather_sequence / pack_varlen: the Triton kernel against the torch twin, bit for bit.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any import).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from vtprune.kernels import gather_sequence, gather_sequence_ref, pack_varlen, pack_varlen_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ragged_keep(
    B: int, L: int, n_keep: int, *, empty_row: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, valid), both (B, n_keep): row b keeps a sorted random subset, left-padded with index 0."""
    index = torch.zeros(B, n_keep, dtype=torch.long)
    valid = torch.zeros(B, n_keep, dtype=torch.bool)
    for b in range(B):
        n = 0 if b == empty_row else (n_keep if b == 0 else int(torch.randint(0, n_keep + 1, ())))
        if n:
            index[b, n_keep - n:] = torch.randperm(L)[:n].sort().values
            valid[b, n_keep - n:] = True
    return index.to(DEVICE), valid.to(DEVICE)


def assert_same(out, ref) -> None:
    assert type(out) is type(ref)
    for name, a, r in zip(out._fields, out, ref, strict=True):
        if isinstance(r, torch.Tensor):
            assert a.dtype == r.dtype and a.shape == r.shape, name
            assert torch.equal(a, r), name
        else:
            assert a == r, name


def make_positions(kind: str, B: int, L: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "1d":
        return torch.randint(0, 10_000, (B, L), device=DEVICE)
    if kind == "shared":  # (1, L): one row for the whole batch, broadcast
        return torch.arange(L, device=DEVICE)[None]
    R = 3 if kind == "mrope3" else 4
    return torch.randint(0, 10_000, (R, B, L), device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,D,n_keep", [(1, 16, 8, 4), (2, 37, 129, 20), (3, 37, 129, 37), (2, 37, 129, 0)])
def test_gather_matches_ref(B, L, D, n_keep, dtype):
    hidden = torch.randn(B, L, D, device=DEVICE).to(dtype)
    index, valid = ragged_keep(B, L, n_keep)
    pos = make_positions("mrope3", B, L)
    mask = torch.randint(0, 2, (B, L), device=DEVICE)
    out = gather_sequence(hidden, index, valid, pos, mask, backend="triton")
    assert_same(out, gather_sequence_ref(hidden, index, valid, pos, mask))
    assert out.hidden.shape == (B, n_keep, D) and out.position_ids.shape == (3, B, n_keep)
    assert torch.equal(out.hidden, hidden.gather(1, index[:, :, None].expand(-1, -1, D)))  # the definition


@pytest.mark.parametrize("pos_kind", ["none", "1d", "shared", "mrope3", "mrope4"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int64"])
def test_gather_positions_and_mask(pos_kind, mask_kind):
    B, L, D, n_keep = 3, 37, 40, 21
    hidden = torch.randn(B, L, D, device=DEVICE)
    index, valid = ragged_keep(B, L, n_keep, empty_row=2)  # one row with nothing kept
    pos = make_positions(pos_kind, B, L)
    mask = {"none": None, "bool": torch.rand(B, L, device=DEVICE) > 0.2,
            "int64": torch.randint(0, 2, (B, L), device=DEVICE)}[mask_kind]
    out = gather_sequence(hidden, index, valid, pos, mask, backend="triton")
    assert_same(out, gather_sequence_ref(hidden, index, valid, pos, mask))
    # Semantics, independently of the ref: the mask is the source mask on valid slots and 0 on padding.
    src_mask = mask.long() if mask is not None else torch.ones(B, L, dtype=torch.long, device=DEVICE)
    for b in range(B):
        expect = torch.where(valid[b], src_mask[b, index[b]], 0)
        assert torch.equal(out.attention_mask[b].long(), expect)
    assert out.attention_mask.dtype == (mask.dtype if mask is not None else torch.long)
    assert not out.attention_mask[2].any()
    if pos is not None:
        assert out.position_ids.shape == ((B, n_keep) if pos.dim() == 2 else (pos.shape[0], B, n_keep))


def test_gather_non_contiguous_and_int32_index():
    B, L, D, n_keep = 2, 37, 129, 13
    hidden = torch.randn(L, B, 2 * D, device=DEVICE).transpose(0, 1)[:, :, ::2]  # (B, L, D), no unit stride
    index, valid = ragged_keep(B, L, 2 * n_keep)
    index, valid = index[:, ::2], valid[:, ::2]  # non-contiguous (B, n_keep)
    pos = torch.randint(0, 99, (B, 3, L), device=DEVICE).permute(1, 0, 2)  # (3, B, L) with permuted strides
    mask = torch.randint(0, 2, (L, B), device=DEVICE).t()
    assert not any(t.is_contiguous() for t in (hidden, index, pos, mask))
    out = gather_sequence(hidden, index.int(), valid, pos, mask, backend="triton")
    assert_same(out, gather_sequence_ref(hidden, index, valid, pos, mask))


@pytest.mark.parametrize("packed", [False, True])
def test_many_tiles(packed):
    """Small tiles: many programs per row and per feature dim, so only the first D-tile writes metadata."""
    from vtprune.kernels.gather_triton import gather_sequence_triton, pack_varlen_triton

    B, L, D, n_keep = 2, 37, 129, 30
    hidden = torch.randn(B, L, D, device=DEVICE, dtype=torch.bfloat16)
    index, valid = ragged_keep(B, L, n_keep)
    pos = make_positions("mrope3", B, L)
    if packed:
        assert_same(pack_varlen_triton(hidden, index, valid, pos, blocks=(8, 32)),
                    pack_varlen_ref(hidden, index, valid, pos))
    else:
        mask = torch.randint(0, 2, (B, L), device=DEVICE)
        assert_same(gather_sequence_triton(hidden, index, valid, pos, mask, blocks=(8, 32)),
                    gather_sequence_ref(hidden, index, valid, pos, mask))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_kind", ["none", "1d", "mrope3"])
@pytest.mark.parametrize("B,L,D,n_keep,empty_row",
                         [(3, 37, 129, 20, 1), (2, 16, 8, 16, None), (2, 16, 8, 0, None)])
def test_pack_varlen(B, L, D, n_keep, empty_row, pos_kind, dtype):
    hidden = torch.randn(B, L, D, device=DEVICE).to(dtype)
    index, valid = ragged_keep(B, L, n_keep, empty_row=empty_row)
    pos = make_positions(pos_kind, B, L)
    out = pack_varlen(hidden, index, valid, pos, backend="triton")
    assert_same(out, pack_varlen_ref(hidden, index, valid, pos))
    # The varlen contract, independently of the ref: row b's valid kept rows, in slot order.
    cu = out.cu_seqlens.tolist()
    assert out.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == int(valid.sum())
    assert out.max_seqlen == max(int(valid[b].sum()) for b in range(B))
    for b in range(B):
        rows = index[b][valid[b]]
        assert torch.equal(out.packed[cu[b]:cu[b + 1]], hidden[b, rows])
        if pos is not None:
            src = pos[..., b, :] if pos.dim() == 3 else pos[b]
            assert torch.equal(out.position_ids[..., cu[b]:cu[b + 1]], src[..., rows])


def test_bad_shapes_raise():
    hidden = torch.randn(2, 8, 4, device=DEVICE)
    index, valid = ragged_keep(2, 8, 3)
    with pytest.raises(ValueError, match="valid must match"):
        gather_sequence(hidden, index, valid[:, :2], backend="triton")
    with pytest.raises(ValueError, match="position_ids"):
        short = torch.zeros(2, 7, dtype=torch.long, device=DEVICE)
        gather_sequence(hidden, index, valid, short, backend="triton")
    with pytest.raises(ValueError, match="attention_mask"):
        gather_sequence(hidden, index, valid, None, torch.ones(2, 8, 1, device=DEVICE), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (compiled, autotuned path)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_on_gpu(dtype):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    B, L, D, n_keep = 4, 620, 4096, 144  # LLaVA-1.5: 576 visual tokens, 144 kept
    hidden = torch.randn(B, L, D, device="cuda", dtype=dtype)
    index, valid = ragged_keep(B, L, n_keep)
    pos = torch.randint(0, L, (3, B, L), device="cuda")
    mask = torch.randint(0, 2, (B, L), device="cuda")
    assert_same(gather_sequence(hidden, index, valid, pos, mask),
                gather_sequence_ref(hidden, index, valid, pos, mask))
    assert_same(pack_varlen(hidden, index, valid, pos), pack_varlen_ref(hidden, index, valid, pos))
