"""The vLLM plugin's host-independent parts, without vLLM: its configuration (what starts an engine and what
refuses to, with which message), the kept count an image's size implies (= what the selection core keeps), and
the positions it writes (= transformers' ``get_rope_index`` on the unpruned prompt, gathered at the kept tokens,
also when the prompt is prefilled in chunks). The engine-level tests live in tests/vllm (the vLLM venv)."""

from __future__ import annotations

import pytest
import torch

from vtprune.integrations.vllm import positions
from vtprune.integrations.vllm.config import PluginConfig, kept_count, steps_for
from vtprune.integrations.vllm.families import VllmLlava, VllmQwen2_5_VL, VllmQwen3VL, family_for
from vtprune.testing import tiny


@pytest.fixture(scope="module")
def llava_config():
    from transformers import AutoConfig

    from vtprune.bench.accuracy import DEFAULT_MODEL

    return AutoConfig.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def qwen():
    return tiny.build("qwen2_5_vl")


@pytest.mark.parametrize("raw", [
    {"method": "kcenter", "keep": 64}, {"method": "visionzip", "ratio": 0.889}, {"method": ["visionzip", "kcenter"],
                                                                                 "keep": 64},
    {"method": "random:seed=3", "keep": 64}, {"method": "random", "seed": 3, "keep": 64},
    {"method": "cls_attention", "keep": 64, "positions": "compact"}, '{"method": "pool", "keep": 144}',
])
def test_configs_that_start(raw, llava_config):
    steps = steps_for(PluginConfig.parse(raw), VllmLlava(llava_config))
    assert steps and all(s.layer is None for s in steps)


@pytest.mark.parametrize(("raw", "message"), [
    ({"keep": 64}, "needs a method"),
    ({"method": "nope", "keep": 64}, "nope"),
    ({"method": "kcenter"}, "has no budget"),
    ({"method": "kcenter", "keep": 0}, "keep"),
    ({"method": "kcenter", "ratio": 1.5}, "ratio"),
    ({"method": "kcenter", "keep": 64, "budget": "temporal"}, "before the encoder runs"),
    ({"method": "kcenter", "keep": 64, "budget": "global"}, "before the encoder runs"),
    ({"method": "fastv", "keep": 64, "layer": 2}, "inside the LLM"),
    ({"method": "fastv:layer=2", "keep": 64}, "inside the LLM"),
    ({"method": "dart", "keep": 64}, "inside the LLM"),
    ({"method": "coverage", "keep": 64}, "prompt's text"),
    ({"method": "vscan", "keep": 64}, "adds an in-LLM step \\(vscan_drop\\)"),
    ({"method": "cdpruner", "keep": 64}, "prompt's text"),
    ({"method": "evs", "ratio": 0.75}, "--video-pruning-method"),
    ({"method": "vidcom2", "ratio": 0.75}, "--video-pruning-method"),
    ({"method": "kcenter", "keep": 64, "positions": "shifted"}, "positions"),
    ({"method": "random", "seed": -1, "keep": 64}, "seed"),
    ({"method": "cls_attention", "vit_layer": 9, "keep": 64}, "vit_layer=9"),
    ("not json", "not JSON"),
])
def test_bad_configs_refused_with_the_reason(raw, message, llava_config):
    with pytest.raises(ValueError, match=message):
        steps_for(PluginConfig.parse(raw), VllmLlava(llava_config))


def test_llava_next_keeps_every_newline_and_counts_them_before_selection():
    """vLLM needs each image's count before selection: the default newline rule is refused, and with
    ``newlines="all"`` the count from the image's size is what transformers keeps."""
    import vtprune
    from vtprune.integrations.vllm.config import Plan
    from vtprune.testing.tiny import IMAGE, Row, make_inputs

    model = tiny.build("llava_next")
    adapter = family_for(model.config, "LlavaNextForConditionalGeneration")
    with pytest.raises(ValueError, match='"newlines": "all"'):
        steps_for(PluginConfig.parse({"method": "kcenter", "keep": 3}), adapter)
    cfg = PluginConfig.parse({"method": "cls_attention", "keep": 3, "newlines": "all"})
    plan = Plan(cfg, adapter, steps_for(cfg, adapter))
    for size in [(40, 50), (56, 28), (28, 28), (30, 30)]:
        inputs = make_inputs(model, [Row(image_size=size)])
        lay = adapter.layout_of(size)
        vis = (inputs["input_ids"][0] == IMAGE).nonzero()[:, 0]
        assert lay.num_tokens == vis.numel() == adapter.num_tokens(size[1], size[0])
        with vtprune.prune(model, "cls_attention", keep=3, newlines="all") as h, torch.no_grad():
            model(**inputs)
            kept = int(torch.isin(vis, h.stats.kept_positions[0]).sum())
        assert kept == plan.kept_item(lay.num_tokens, 1, int((lay.src == -1).sum()))


def test_llava_onevision_video_keeps_its_newline_and_counts_frames():
    import vtprune
    from vtprune.integrations.vllm.config import Plan
    from vtprune.testing.tiny import VIDEO, Row, make_inputs

    model = tiny.build("llava_onevision")
    adapter = family_for(model.config, "LlavaOnevisionForConditionalGeneration")
    cfg = PluginConfig.parse({"method": "kcenter", "keep": 2, "newlines": "all"})
    plan = Plan(cfg, adapter, steps_for(cfg, adapter))
    inputs = make_inputs(model, [Row(images=0, video_frames=3)])
    vis = (inputs["input_ids"][0] == VIDEO).nonzero()[:, 0]
    lay = adapter.video_record(3).images[0]
    assert lay.num_tokens == vis.numel() and adapter.structural_tokens({"pixel_values_videos": None}) == 1
    with vtprune.prune(model, "kcenter", keep=2, newlines="all") as h, torch.no_grad():
        model(**inputs)
        kept = int(torch.isin(vis, h.stats.kept_positions[0]).sum())
    assert kept == plan.kept_item(lay.num_tokens, 3, 1) == 3 * 2 + 1  # two per frame, and the newline


def test_internvl_plans_vision_tower_methods_and_joins_tiles_per_image():
    config = tiny.build("internvl").config
    adapter = family_for(config, "InternVLForConditionalGeneration")
    for raw in ({"method": "kcenter", "keep": 16}, {"method": "pool", "ratio": 0.75, "positions": "compact"}):
        assert steps_for(PluginConfig.parse(raw), adapter)
    for method in ("cls_attention", "visionzip", "zeroth_order", "mmr", "kcenter:variant=todre", "vispruner",
                   "hiprune", "holov", "vscan:drop_layer=None"):
        assert steps_for(PluginConfig.parse({"method": method, "keep": 16}), adapter)
    with pytest.raises(ValueError, match="out of range"):
        steps_for(PluginConfig.parse({"method": "cls_attention", "keep": 16, "vit_layer": 5}), adapter)
    record = adapter.record([3, 1])  # two images of 3 tiles and 1: one span each, tiles side by side
    assert [im.num_tokens for im in record.images] == [3 * 16, 16]
    assert record.images[0].grid[:, 0].unique().tolist() == [0, 1, 2]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_plans_vision_tower_methods_and_refuses_compact(family, qwen):
    config = qwen.config if family == "qwen2_5_vl" else tiny.build(family).config
    adapter = family_for(config, type(config).__name__.replace("Config", "ForConditionalGeneration"))
    for method in ("kcenter", "zeroth_order", "visionzip", "mmr", "cls_attention", "kcenter:variant=todre",
                   "vispruner", "hiprune", "holov", "vscan:drop_layer=None"):
        assert steps_for(PluginConfig.parse({"method": method, "keep": 16}), adapter)
    with pytest.raises(ValueError, match="out of range"):
        steps_for(PluginConfig.parse({"method": "visionzip", "keep": 16, "vit_layer": 9}), adapter)
    with pytest.raises(ValueError, match="compact"):
        steps_for(PluginConfig.parse({"method": "kcenter", "keep": 16, "positions": "compact"}), adapter)
    assert adapter.vit_heads(None) == (4, 8)  # the tiny tower: width 32, 4 heads


def test_a_compiled_vision_encoder_refuses_vision_tower_signals(qwen):
    """compile_mm_encoder traces the ViT, where the captures of ViT signals live: refused at engine start, while a
    method reading the token sequence starts."""
    from types import SimpleNamespace

    from vtprune.integrations.vllm.config import ATTR, configure

    def start(raw):
        config = tiny.build("qwen2_5_vl").config
        vllm_config = SimpleNamespace(
            additional_config={"vtprune": raw}, compilation_config=SimpleNamespace(compile_mm_encoder=True),
            model_config=SimpleNamespace(hf_config=config, architecture="Qwen2_5_VLForConditionalGeneration"))
        configure(vllm_config)
        return getattr(config, ATTR, None)

    assert start({"method": "kcenter", "keep": 8}) is not None
    with pytest.raises(ValueError, match="compile_mm_encoder"):
        start({"method": "visionzip", "keep": 8})


def test_qwen3_signals_read_the_token_not_its_deepstack_columns():
    config = tiny.build("qwen3_vl").config
    adapter = VllmQwen3VL(config)
    assert adapter.signal_width() == config.vision_config.out_hidden_size  # the rest: one row per DeepStack level
    assert VllmQwen2_5_VL(tiny.build("qwen2_5_vl").config).signal_width() is None


@pytest.mark.parametrize("raw", [{"method": "kcenter", "keep": 5}, {"method": "kcenter", "ratio": 0.777},
                                 {"method": ["visionzip", "kcenter"], "keep": 6},
                                 {"method": "visionzip", "keep": 7}, {"method": "pool", "ratio": 0.75}])
def test_kept_count_is_what_the_core_keeps(raw, llava_config):
    """The placeholder count the processor gives an image equals the kept tokens of the HF host on it."""
    import vtprune
    from vtprune.testing.tiny import Row, build, image_tokens, make_inputs

    steps = steps_for(PluginConfig.parse(raw), VllmLlava(llava_config))
    model = build("llava")
    n = image_tokens(model)
    cfg = PluginConfig.parse(raw)
    with vtprune.prune(model, cfg.method, keep=cfg.keep, ratio=cfg.ratio) as handle, torch.no_grad():
        model(**make_inputs(model, [Row()]))
        got = handle.stats.visual_after[0]
    assert kept_count(steps, n, 3) == got


def _qwen_prompt(qwen, grids: list[tuple[int, int]], keep: int, seed: int = 0):
    """A prompt with one image per grid (h, w in patches): unpruned ids, the HF positions, and per image a random
    kept subset with its merged-grid coordinates."""
    from vtprune.testing.tiny import IMAGE, VEND, VSTART

    ids, kept, g = [7, 8], [], torch.Generator().manual_seed(seed)
    for h, w in grids:
        n = h * w // 4
        ids += [VSTART] + [IMAGE] * n + [VEND, 9, 10]
        kept.append(torch.sort(torch.randperm(n, generator=g)[:keep]).values)
    input_ids = torch.tensor([ids])
    grid = torch.tensor([[1, h, w] for h, w in grids])
    tt = (input_ids == IMAGE).int()
    ref, _ = qwen.model.get_rope_index(input_ids, mm_token_type_ids=tt, image_grid_thw=grid)
    return input_ids[0], ref[:, 0], kept, grid


@pytest.mark.parametrize("grids", [[(8, 4)], [(4, 8)], [(8, 4), (4, 12), (6, 6)]])  # tall, wide, mixed
@pytest.mark.parametrize("chunk", [None, 5, 17])
def test_positions_equal_transformers_on_the_kept_tokens(qwen, grids, chunk):
    from vtprune.testing.tiny import IMAGE

    adapter = VllmQwen2_5_VL(qwen.config)
    keep = 5
    ids, ref, kept, grid = _qwen_prompt(qwen, grids, keep)
    ph0 = ids == IMAGE
    keep_mask = ~ph0.clone()
    starts = ph0.nonzero()[:, 0]
    cols, offset, media = [], 0, []
    record = adapter.record(grid)
    for (h, w), k, lay in zip(grids, kept, record.images):
        first = int(starts[offset])
        keep_mask[first + k] = True
        g = lay.grid[k]
        cols.append(positions.offset_columns(torch.stack([g[:, 0], g[:, 1], g[:, 2]], 1), torch.bfloat16))
        offset += h * w // 4
    pruned = ids[keep_mask]
    want = ref[:, keep_mask]
    ph = pruned == IMAGE
    runs = ph & ~torch.cat([ph.new_zeros(1), ph[:-1]])
    for s, (h, w) in zip(runs.nonzero()[:, 0].tolist(), grids):
        media.append((s, keep, max(h // 2, w // 2)))
    pos, delta = positions.prompt_positions(len(pruned), media, one_d=False)
    embeds = [torch.cat([torch.zeros(keep, 4, dtype=torch.bfloat16), c], 1) for c in cols]
    if chunk is None:
        out, pos = positions.recompute(embeds, pos, 0, ph, one_d=False)
        assert all(o.shape == (keep, 4) for o in out)
    else:  # prefill in chunks of `chunk` tokens: each chunk brings the media rows it covers
        rows = torch.cat(embeds)
        idx = ph.nonzero()[:, 0]
        for start in range(0, len(pruned), chunk):
            sel = (idx >= start) & (idx < start + chunk)
            if sel.any():
                pos_rows = rows[sel.nonzero()[:, 0]]
                _, pos = positions.recompute([pos_rows], pos, start, ph, one_d=False)
    assert torch.equal(pos, want), (pos, want)
    assert positions.decode_delta(pos, ph) == int(ref.max()) + 1 - len(pruned)
    assert delta == int(ref.max()) + 1 - len(pruned)


def test_one_d_positions_keep_original_indices():
    """LLaVA: row 0 is plain RoPE on the original positions; rows 1 / 2 hold each image's start / end."""
    n, keep = 10, 4
    ids = torch.tensor([1, 2] + [5] * keep + [5] * keep + [3])  # two adjacent images, then text
    ph = ids == 5
    pos, delta = positions.prompt_positions(len(ids), [(2, keep, n), (2 + keep, keep, n)], one_d=True)
    kept = [torch.tensor([0, 3, 4, 9]), torch.tensor([1, 2, 5, 8])]
    embeds = [torch.cat([torch.zeros(keep, 2), positions.offset_columns(torch.stack([k, 0 * k, 0 * k], 1),
                                                                         torch.float32)], 1) for k in kept]
    out, pos = positions.recompute(embeds, pos, 0, ph, one_d=True)
    assert pos[0].tolist() == [0, 1] + [2 + int(i) for i in kept[0]] + [12 + int(i) for i in kept[1]] + [22]
    assert delta == positions.decode_delta(pos, ph) == 23 - len(ids)
    tail = torch.tensor([1] + [5] * keep)  # a prompt ending with its image: the next token follows its extent
    p2, d2 = positions.prompt_positions(len(tail), [(1, keep, n)], one_d=True)
    _, p2 = positions.recompute([embeds[0]], p2, 0, tail == 5, one_d=True)
    assert d2 == positions.decode_delta(p2, tail == 5) == 1 + n - len(tail)


def test_shipped_checkpoint_is_in_the_layout_vllm_loads(tmp_path):
    """vLLM loads a LLaVA's vision tower from ``vision_tower.vision_model.*`` only (transformers loads both)."""
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from vtprune.bench.accuracy import DEFAULT_MODEL
    from vtprune.synthetic.model import canonical_llava_layout

    with safe_open(DEFAULT_MODEL / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    model = tiny.build("llava")  # what transformers' save_pretrained writes, made canonical
    model.save_pretrained(tmp_path)
    canonical_llava_layout(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert all(k.startswith("vision_tower.vision_model.") for k in f.keys() if k.startswith("vision_tower."))
    loaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_unsupported_architecture_is_refused_by_name(llava_config):
    from vtprune.integrations.vllm.families import family_for

    with pytest.raises(ValueError, match="InternVLChatModel.*supported: .*LlavaForConditionalGeneration"):
        family_for(llava_config, "InternVLChatModel")
