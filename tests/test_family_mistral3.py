"""Mistral-3 / Pixtral specifics, each against an independent reference: the [IMG_BREAK] / [IMG_END] text tokens
survive pruning where they stood, the grid of every image (variable sizes, several in one prompt, rows of
different sizes) is the prompt's own layout, and the packed ViT's signals are per-image blocks equal to the eager
tower's attention maps."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from test_masks import Planted, field_value
from vtprune.methods.base import Method
from vtprune.testing.reference import masked_forward, pruned_rows
from vtprune.testing.tiny import BOS, IMAGE, PAD, VEND as IMG_END, VSTART as IMG_BREAK, build


@functools.cache
def _model(attn: str = "sdpa") -> torch.nn.Module:
    return build("mistral3", attn)


# Row 0: two images of different sizes in one prompt; row 1: an image of a third size. (H, W) in pixels, which
# tiny_grid rounds to 8-px tokens: 3 x 5 and 6 x 2, then 4 x 7.
TWO_SIZES = [[11, 12, ((24, 40), 1), 13, ((48, 16), 2), 14, 15, 16], [21, ((32, 56), 3), 22, 23]]


def prompt(model, rows: list[list], padding: str = "left") -> dict:
    """Inputs of rows of text ids and ((H, W), seed) images, padded, the images batched as the processor does."""
    adapter = vtprune.adapter_for(model)
    seqs, images = [], []
    for row in rows:
        ids = [BOS]
        for item in row:
            if isinstance(item, int):
                ids.append(item)
                continue
            tokens, pixels = adapter.tiny_image(*item)
            ids += tokens
            images.append(pixels)
        seqs.append(ids)
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, r in enumerate(seqs):
        sl = slice(L - len(r), L) if padding == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask, **adapter.tiny_batch(ids, images, [])}


def two_sizes_inputs(model, padding: str = "left") -> dict:
    return prompt(model, TWO_SIZES, padding)


def prompt_grids(ids: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per image of one row, (position, row, col) of each [IMG] read off the prompt alone: runs of [IMG] closed by
    [IMG_BREAK] (next row) or [IMG_END] (next image)."""
    images, cur, r, c = [], [], 0, 0
    for p, t in enumerate(ids.tolist()):
        if t == IMAGE:
            cur.append((p, r, c))
            c += 1
        elif t == IMG_BREAK:
            r, c = r + 1, 0
        elif t == IMG_END:
            images.append(cur)
            cur, r, c = [], 0, 0
    return images


def test_inputs_have_the_variable_sizes_they_claim():
    model = _model()
    inputs = two_sizes_inputs(model)
    assert inputs["image_sizes"].tolist() == [[24, 40], [48, 16], [32, 56]]
    grids = [[(max(g[1] for g in im) + 1, max(g[2] for g in im) + 1) for im in prompt_grids(row)]
             for row in inputs["input_ids"]]
    assert grids == [[(3, 5), (6, 2)], [(4, 7)]]
    with torch.no_grad():  # the model itself accepts the layout (its placeholder count check)
        model(**inputs)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_planted_selection_keeps_exactly_the_planted_cells(padding):
    """A score planted on (row, col) of each image keeps, per image, the top cells of that field: the grid the
    adapter gives every token is the prompt's own (variable sizes, two sizes in one prompt, rows of different
    sizes)."""
    model = _model()
    inputs = two_sizes_inputs(model, padding)
    k = 4
    with vtprune.prune(model, Planted(), keep=k, budget="per_image") as h:
        with torch.no_grad():
            model(**inputs)
        stats, masks = h.stats, h.kept_masks()
    for b in range(inputs["input_ids"].shape[0]):
        want = set()
        for im in prompt_grids(inputs["input_ids"][b]):
            pos, r, c = (torch.tensor(x) for x in zip(*im))
            vals = field_value(torch.zeros_like(r), r, c, 0)
            want |= set(pos[torch.argsort(vals, descending=True)[:k]].tolist())
        assert set(stats.kept_positions[b].tolist()) & want == want
        visual = inputs["input_ids"][b] == IMAGE
        kept_visual = {p for p in stats.kept_positions[b].tolist() if visual[p]}
        assert kept_visual == want
    shapes = [(m.row, [g.shape for g in m.grids]) for m in masks]
    assert shapes == [(0, [(3, 5)]), (0, [(6, 2)]), (1, [(4, 7)])]


@pytest.mark.parametrize("method,kw", [(Planted(), {"keep": 1}), ("kcenter", {"ratio": 0.7}),
                                       ("fastv", {"ratio": 0.6, "layer": 1})])
def test_breaks_and_ends_survive_at_their_positions(method, kw):
    """[IMG_BREAK] / [IMG_END] are text: every one is in the pruned sequence, at its original position (the LLM
    gets its own embedding there), they are never counted, and rows emptied of [IMG] tokens keep their break."""
    model = _model()
    inputs = two_sizes_inputs(model)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("llm", (kwargs["inputs_embeds"], kwargs["position_ids"]))

    with vtprune.prune(model, method, **kw) as h:  # our hook after the engine's: it sees the pruned input
        hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            hook.remove()
        stats = h.stats
    ids = inputs["input_ids"]
    assert stats.visual_before == (ids == IMAGE).sum(1).tolist()  # breaks and ends are not counted
    embeds, positions = seen["llm"]
    table = model.get_input_embeddings().weight
    emptied = 0
    for b in range(ids.shape[0]):
        kept = stats.kept_positions[b]
        structural = ((ids[b] == IMG_BREAK) | (ids[b] == IMG_END)).nonzero()[:, 0]
        assert torch.isin(structural, kept).all()
        for im in prompt_grids(ids[b]):
            for r in {g[1] for g in im}:
                emptied += int(not torch.isin(torch.tensor([g[0] for g in im if g[1] == r]), kept).any())
        if "layer" in kw:
            continue  # the LLM input is whole; the cut happens inside
        slots = embeds.shape[1] - kept.numel() + torch.searchsorted(kept, structural)  # the pruned batch: left-padded
        assert torch.equal(embeds[b, slots], table[ids[b, structural]])  # their own text embeddings
        assert torch.equal(positions[b, slots].cpu(), structural)  # their original positions
    if isinstance(method, Planted):
        assert emptied > 0  # keep=1 per image: most rows lose all their tokens, their breaks stay


def test_pruned_forward_matches_the_masked_reference_with_two_sizes():
    """The masked full forward (original positions) on the variable-size prompt, both paddings."""
    model = _model()
    for padding in ("left", "right"):
        inputs = two_sizes_inputs(model, padding)
        with vtprune.prune(model, "kcenter", ratio=0.6) as h:
            with torch.no_grad():
                out = model(**inputs).logits
            stats = h.stats
        ref = masked_forward(model, inputs, stats)
        for b, rows in enumerate(pruned_rows(out, stats)):
            kept = stats.kept_positions[b]
            real = inputs["attention_mask"][b, kept].bool()
            torch.testing.assert_close(rows[real], ref[b, kept][real], atol=2e-5, rtol=1e-4)


@dataclass(frozen=True, kw_only=True)
class TextProbe(Method):
    """Keeps the first k candidates at its layer and records the instruction signals it reads."""

    name: ClassVar[str] = "mistral3_text_probe"
    requires: ClassVar[frozenset[str]] = frozenset({"instruction_ids", "text_attention_rows", "text_attention"})
    scored_at_previous_layer: ClassVar[bool] = True
    seen: ClassVar[list] = []

    def select(self, sig, k):
        TextProbe.seen.append({"rows": sig.rows, "ids": sig.instruction_ids, "att_rows": sig.text_attention_rows,
                               "att": sig.text_attention(query="instruction")})
        return torch.arange(k).expand(sig.num_spans, k)


def test_instruction_is_the_text_after_the_last_image_even_when_its_tokens_were_dropped():
    """Behind a first step that keeps two tokens an image, the text after the visual tokens (the queries of in-LLM
    text attention) is still the prompt's text after its last [IMG]: the breaks of the emptied last rows, now after
    the last kept token, are not instruction tokens; every instruction signal has the same queries."""
    model = _model()
    inputs = two_sizes_inputs(model)
    TextProbe.seen.clear()
    with vtprune.prune(model, [Planted(keep=2), TextProbe(layer=2, keep=1)], keep=2, budget="per_image"):
        with torch.no_grad():
            model(**inputs)
    assert TextProbe.seen, "the probe was never called"
    for got in TextProbe.seen:
        ids, ok = got["ids"]
        for s, b in enumerate(got["rows"].tolist()):
            row = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
            last = int((row == IMAGE).nonzero().max())
            assert ids[s][ok[s]].tolist() == row[last + 1:].tolist()  # [IMG_END] and the question
        rows = got["att_rows"]  # (S, T, N): one row per instruction token
        assert rows.shape[1] == ids.shape[1]
        w = ok.float()[..., None]
        torch.testing.assert_close(got["att"], (rows * w).sum(1) / w.sum(1), atol=1e-6, rtol=1e-5)


# ============================================================================ vision-tower signals
@dataclass(frozen=True, kw_only=True)
class Probe(Method):
    """Keeps the first k candidates and records the ViT signals it reads."""

    name: ClassVar[str] = "mistral3_probe"
    requires: ClassVar[frozenset[str]] = frozenset({"received_attention", "vit_keys"})
    seen: ClassVar[list] = []

    def select(self, sig, k):
        Probe.seen.append({"rows": sig.rows, "positions": sig.positions, "received": sig.received_attention(),
                           "keys": sig.vit_keys()})
        return torch.arange(k).expand(sig.num_spans, k)


def probe(model, inputs) -> list[dict]:
    """Per span (image), in prompt order: its row, positions and ViT signals (one call per span group)."""
    Probe.seen.clear()
    with vtprune.prune(model, Probe(), keep=1):
        with torch.no_grad():
            model(**inputs)
    spans = [{k: v[s] for k, v in got.items()} for got in Probe.seen for s in range(got["rows"].shape[0])]
    return sorted(spans, key=lambda sp: (int(sp["rows"]), int(sp["positions"][0])))


@pytest.mark.parametrize("block", [1 << 20, 7], ids=["whole", "7-row-blocks"])
def test_received_attention_is_the_eager_maps_per_image_block(block, monkeypatch):
    """The eager tower's last-layer attention (its block-diagonal mask) averaged over heads and the queries of
    each image, then summed over each token's 2 x 2 patches, equals the signal; each image's scores sum to 1.
    Also when the column sums are accumulated over blocks of query rows (bounded memory)."""
    import vtprune.adapters.mistral3 as M

    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", block * 112)  # the largest image has 112 patches
    model = _model("eager")
    inputs = two_sizes_inputs(model)
    spans = probe(model, inputs)
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                       output_attentions=True).attentions[-1][0]  # (H, N, N)
    a = 0
    assert len(spans) == inputs["image_sizes"].shape[0]
    for span, (H, W) in zip(spans, inputs["image_sizes"].tolist()):  # spans and images: both in prompt order
        hp, wp = H // 4, W // 4
        b = a + hp * wp
        assert float(att[:, a:b, :a].abs().sum() + att[:, a:b, b:].abs().sum()) == 0  # the block-diagonal mask
        recv = att[:, a:b, a:b].mean(dim=(0, 1)).reshape(hp, wp)  # (hp, wp)
        expected = recv.reshape(hp // 2, 2, wp // 2, 2).sum(dim=(1, 3)).reshape(-1)  # 2 x 2 patches, raster
        torch.testing.assert_close(span["received"], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(span["received"].sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
        a = b


def test_vit_keys_of_an_image_do_not_depend_on_its_neighbours():
    """Packed with other images, an image's rotated keys are those of the image alone: positions restart per
    image (the axial RoPE of its own grid) and nothing leaks across blocks."""
    model = _model()
    both = probe(model, two_sizes_inputs(model))
    (single,) = probe(model, prompt(model, TWO_SIZES[1:]))
    torch.testing.assert_close(both[2]["keys"], single["keys"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both[2]["received"], single["received"], atol=1e-6, rtol=1e-5)
    n = both[0]["keys"].shape[0]
    assert not torch.allclose(both[0]["keys"], single["keys"][:n])  # another image: other keys


def test_layout_mismatch_is_a_clear_error():
    model = _model()
    adapter = vtprune.adapter_for(model)
    inputs = prompt(model, TWO_SIZES[1:])
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    from vtprune.adapters.base import VisionRecord

    with pytest.raises(ValueError, match="2 feature tensors for 1 image_sizes"):
        adapter.image_layouts("image", (), {"image_sizes": inputs["image_sizes"]},
                              type(out)(pooler_output=out.pooler_output * 2), VisionRecord())
    with pytest.raises(ValueError, match="called without image_sizes"):
        adapter.image_layouts("image", (inputs["pixel_values"],), {}, out, VisionRecord())


def test_lmms_eval_wrapper_subclasses_mistral3_vl_and_validates_first():
    """``vtprune_mistral3_vl`` is lmms-eval's own ``mistral3_vl`` with pruning; bad arguments fail before a load."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.models.simple.mistral3_vl import Mistral3_VL

    from vtprune.integrations.lmms_eval import PruningMixin, model_class

    cls = model_class("vtprune_mistral3_vl")
    assert cls.__name__ == "VTPruneMistral3VL" and issubclass(cls, PruningMixin) and issubclass(cls, Mistral3_VL)
    missing = "/nonexistent/model"  # a load attempt would raise OSError, not ValueError
    with pytest.raises(ValueError, match=r"'bogus'.*max_num_frames"):  # the allowed list: the parent's signature
        cls(pretrained=missing, method="random", keep=4, bogus=1)
    with pytest.raises(ValueError, match=r"kcentre"):
        cls(pretrained=missing, method="kcentre", ratio=0.5)
