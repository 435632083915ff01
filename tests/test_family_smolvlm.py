"""SmolVLM / Idefics3: an image is several placeholder runs (its tiles, then its global view) with text between
them, one feature entry holds every tile of a prompt row, and all-zero padding tiles produce nothing. Checked on
a batch whose first row has two images of different tile counts and whose second row has one unsplit image and
seven zero padding tiles."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from test_adapters import _probe
from test_masks import Planted, cells, expected_top, lit

import vtprune
from vtprune.adapters.base import VisionRecord
from vtprune.adapters.smolvlm import GLOBAL, SmolVLMAdapter
from vtprune.testing.tiny import BOS, IMAGE, PAD, build

# (H, W) pictures per row: 2 x 2 tiles + global (5 tiles), 2 x 1 + global (3); one unsplit tile
ROWS = [[(40, 50), (56, 28)], [(20, 20)]]
TILES = [[5, 3], [1]]


@functools.cache
def _model(attn: str = "sdpa") -> torch.nn.Module:
    return build("smolvlm", attn)


def make(model: torch.nn.Module, rows: list[list[tuple[int, int]]] = ROWS) -> tuple[dict, list[list[list[int]]]]:
    """Left-padded inputs batched as the processor does, and the positions of each image's placeholders."""
    adapter = vtprune.adapter_for(model)
    seqs, images, where = [], [], []
    for b, sizes in enumerate(rows):
        ids, mine = [BOS, 7 + b, 8], []
        for i, size in enumerate(sizes):
            tokens, pixels = adapter.tiny_image(size, seed=10 * b + i)
            mine.append([len(ids) + k for k, t in enumerate(tokens) if t == IMAGE])
            ids += tokens + [9]
            images.append(pixels)
        seqs.append(ids + [10, 11])
        where.append(mine)
    L = max(map(len, seqs))
    input_ids = torch.tensor([[PAD] * (L - len(s)) + s for s in seqs])
    mask = (input_ids != PAD).long()
    where = [[[p + L - len(s) for p in im] for im in mine] for s, mine in zip(seqs, where)]
    return {"input_ids": input_ids, "attention_mask": mask, **adapter.tiny_batch(input_ids, images, [])}, where


def test_the_batch_has_zero_padding_tiles():
    inputs, _ = make(_model())
    real = inputs["pixel_values"].flatten(2).ne(0).any(-1)  # (B, N)
    assert real.sum(1).tolist() == [sum(t) for t in TILES] and inputs["pixel_values"].shape[1] == 8


def test_an_image_is_its_tiles_and_global_view():
    """Spans are whole images: the per_image budget keeps exactly k of each image's tiles + global view together,
    the planted top k of the image's cells, each tile its own 4 x 4 grid."""
    model = _model()
    inputs, where = make(model)
    with vtprune.prune(model, Planted(), keep=5, budget="per_image") as h, torch.no_grad():
        model(**inputs)
        masks, stats = h.kept_masks(), h.stats
    lay = stats.layout
    for b, mine in enumerate(where):
        ids = lay.image[b][lay.visual[b]].unique().tolist()
        assert [sorted(lay.visual[b].nonzero()[:, 0][lay.image[b][lay.visual[b]] == i].tolist()) for i in ids] == mine
    assert [im.row for im in masks] == [0, 0, 1]
    assert [len(im.grids) for im in masks] == [t for row in TILES for t in row]
    for im in masks:
        assert all(g.shape == (4, 4) for g in im.grids)
        assert im.kept() == 5 and lit(im, -1) == expected_top(im, 5, 0)
        assert len({c[0] for c in cells(im) if c[3] in lit(im, -1)}) > 1 or len(im.grids) == 1  # across tiles
    assert stats.visual_before == [16 * 8, 16] and stats.visual_after == [10, 5]


def test_structure_tokens_stay_text_at_their_positions():
    """<fake_token_around_image>, <row_r_col_c>, <global-img> and newlines are never dropped; the LLM gets them
    with their text embeddings at their original positions."""
    model = _model()
    inputs, _ = make(model)
    seen = {}

    def grab(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])

    with vtprune.prune(model, "random", ratio=0.75) as h, torch.no_grad():
        hook = model.model.text_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
        kept = h.stats.kept_positions
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    table = model.get_input_embeddings().weight
    for b in range(ids.shape[0]):
        text = (mask[b] & (ids[b] != IMAGE)).nonzero()[:, 0]
        assert set(text.tolist()) <= set(kept[b].tolist())
        assert bool(torch.isin(ids[b, text], torch.tensor([GLOBAL])).any())
        slots = {int(p): j for j, p in enumerate(seen["positions"][b].tolist())}
        rows = torch.tensor([slots[int(p)] for p in text])  # positions: the original indices
        torch.testing.assert_close(seen["embeds"][b, rows], table[ids[b, text]])  # text embeddings, in order
    assert h.stats.visual_after == [32, 4]


def test_received_attention_is_each_tokens_2x2_patch_mass():
    """The ViT signal of a token is the eager attention mass of its 2 x 2 patch block, tiles taken as the model
    takes them (padding tiles dropped, rows in order)."""
    model = _model("eager")
    inputs, _ = make(model)
    got = _probe(model, inputs, extra=("received_attention",))[0]
    pixels = inputs["pixel_values"].flatten(0, 1)
    real = pixels[pixels.flatten(1).ne(0).any(-1)]
    with torch.no_grad():
        att = model.model.vision_model(pixel_values=real, output_attentions=True).attentions[-1]
    received = att.mean(dim=(1, 2)).reshape(-1, 4, 2, 4, 2).sum(dim=(2, 4)).reshape(-1)  # (tiles * 16,)
    vis = inputs["input_ids"] == IMAGE
    seq = torch.full(vis.shape, float("nan"))
    seq[vis] = received
    torch.testing.assert_close(got["received"], seq[got["rows"][:, None], got["positions"]], atol=1e-6, rtol=1e-5)


def test_the_5_19_feature_tensor_gives_the_same_layout():
    """transformers 5.19 returns one (tiles, 16, D) tensor, 5.25 a per-row list: the same record."""
    model = _model()
    adapter = vtprune.adapter_for(model)
    inputs, _ = make(model)
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
    feats = out.pooler_output if isinstance(out.pooler_output, list) else list(out.pooler_output)
    as_list, as_tensor = VisionRecord(), VisionRecord()
    kw = {"pixel_values": inputs["pixel_values"]}
    adapter.image_layouts("image", (), kw, SimpleNamespace(pooler_output=[f.reshape(-1, f.shape[-1]) for f in feats]),
                          as_list)
    stacked = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).reshape(-1, 16, feats[0].shape[-1])
    adapter.image_layouts("image", (), kw, SimpleNamespace(pooler_output=stacked), as_tensor)
    assert as_list.meta["tiles"] == as_tensor.meta["tiles"] == [8, 1] and as_list.n_vit == 9 * 64
    for a, b in zip(as_list.images, as_tensor.images, strict=True):
        assert torch.equal(a.src, b.src) and torch.equal(a.grid, b.grid)
    with pytest.raises(ValueError, match="real tiles"):
        adapter.image_layouts("image", (), kw, SimpleNamespace(pooler_output=stacked[:-1]), VisionRecord())


def test_idefics3_is_the_same_code_path():
    """Idefics3ForConditionalGeneration with the same weights: the same adapter, kept tokens and logits."""
    import transformers as T

    smol = _model()
    cfg, _ = SmolVLMAdapter.tiny_config(3)
    idefics = T.Idefics3ForConditionalGeneration._from_config(
        T.Idefics3Config(**{k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")}),
        attn_implementation="sdpa").eval()
    idefics.load_state_dict(smol.state_dict())
    assert isinstance(vtprune.adapter_for(idefics), SmolVLMAdapter)
    inputs, _ = make(smol)
    out = {}
    for name, model in (("smol", smol), ("idefics", idefics)):
        with vtprune.prune(model, "kcenter", ratio=0.7) as h, torch.no_grad():
            out[name] = (model(**inputs).logits, h.stats.kept_positions)
    torch.testing.assert_close(out["idefics"][0], out["smol"][0])
    assert all(torch.equal(a, b) for a, b in zip(out["idefics"][1], out["smol"][1]))


def test_generate_with_repeated_rows_keeps_the_image_spans():
    """generate() encodes the images once and repeats each row's features for num_return_sequences: every
    repeated row keeps exactly k of each of its images."""
    model = _model()
    inputs, _ = make(model)
    with vtprune.prune(model, "kcenter", keep=3, budget="per_image") as h, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
        assert h.stats.visual_after == [6, 6, 3, 3]
