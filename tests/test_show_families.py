"""``vtprune show`` on every family's tiny model loaded through a REAL Hugging Face processor (saved and reloaded
as a checkpoint directory): the CLI draws, and each family's drawing geometry (``grid_boxes``) is what the
processor and the model actually did -- LLaVA-1.5's centre crop, LLaVA-NeXT / OneVision's unpadded AnyRes canvas,
InternVL's tile arrangement, Qwen's merged grid."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import vtprune
from vtprune.show import DROPPED, PAD_GREY, UNSEEN, _load, encode, main, panels, run
from vtprune.testing import tiny

QUESTION = "What is in the picture ?"
WORDS = ["USER", ":", "ASSISTANT", *QUESTION.split(), "Describe", "the", "image", "."]


def tokenizer(image: str, **extra: tuple[str, int]) -> Any:
    """A word-level tokenizer with the tiny models' special ids (``image`` -> 500) plus ``extra`` special tokens
    (attribute name -> (token, id)), exposed as attributes the processors read (``tokenizer.boi_token`` ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": tiny.PAD, "<s>": tiny.BOS, "</s>": tiny.EOS, "<unk>": 3, image: tiny.IMAGE,
                **{tok: i for tok, i in extra.values()}}
    vocab = dict(specials)
    for w in WORDS:
        vocab.setdefault(w, 4 + len(vocab) - len(specials))
    taken = set(vocab.values())
    vocab |= {f"#{i}": i for i in range(tiny.VOCAB) if i not in taken}  # whatever a random model generates decodes
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.decoder = decoders.WordPiece(cleanup=False)
    model.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>",
                                   extra_special_tokens={"image_token": image, **{k: t for k, (t, _) in extra.items()}})


def template(slot: str) -> str:
    """models/synthetic-llava's prompt with the family's image placeholder ``slot``."""
    return ("{% for m in messages %}USER: {% for p in m['content'] %}{% if p['type'] == 'image' %}" + slot +
            "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")


def image_only(cls: type) -> type:
    """``cls`` without its video processor, registered for ``AutoProcessor``: transformers builds (and loads) a
    video processor only with torchvision, which cannot be installed here (README, Limitations). Everything an
    image goes through -- image processor, tokenizer, placeholder expansion, chat template -- is ``cls``'s own."""
    from transformers import AutoProcessor

    # named parameters, not *args: from_pretrained passes only the saved settings __init__'s code names
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length=None,
                 num_image_tokens=None, vision_feature_select_strategy=None, vision_aspect_ratio=None, **kwargs):
        settings = dict(image_seq_length=image_seq_length, num_image_tokens=num_image_tokens,
                        vision_feature_select_strategy=vision_feature_select_strategy,
                        vision_aspect_ratio=vision_aspect_ratio)
        # ProcessorMixin pairs sub-processors with get_attributes(), read from this signature: no video slot
        cls.__init__(self, image_processor, tokenizer, chat_template=chat_template,
                     **{k: v for k, v in settings.items() if v is not None}, **kwargs)

    sub = type(f"{cls.__name__}ImageOnly", (cls,), {"__init__": __init__})
    AutoProcessor.register(f"vtprune-test-{sub.__name__}", sub, exist_ok=True)  # a key no real config uses
    return sub


QWEN_TOKENS = {"video_token": ("<|video_pad|>", tiny.VIDEO), "vision_start_token": ("<|vision_start|>", tiny.VSTART),
               "vision_end_token": ("<|vision_end|>", tiny.VEND)}
QWEN_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


@contextlib.contextmanager
def torchvision_free(name: str, pil_module: Any) -> Any:
    """Import a processor module whose top imports a helper from the torchvision image processor ``name``: the PIL
    module stands in for it during the import (it defines the same helper), then ``sys.modules`` is restored."""
    saved = sys.modules.get(name)
    sys.modules[name] = pil_module
    try:
        yield
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved


def llava(model: Any) -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    px = model.config.vision_config.image_size  # centre crop: a non-square picture loses its sides
    ip = CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}, do_center_crop=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer("<image>"), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template("<image>\n"))


def llava_next(model: Any) -> Any:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    c = model.config
    px = c.vision_config.image_size
    ip = LlavaNextImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px},
                                   image_grid_pinpoints=c.image_grid_pinpoints)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer("<image>"), patch_size=c.vision_config.patch_size,
                              num_additional_image_tokens=1, chat_template=template("<image>\n"),
                              vision_feature_select_strategy=c.vision_feature_select_strategy)


def llava_onevision(model: Any) -> Any:
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor

    c = model.config
    px = c.vision_config.image_size
    ip = LlavaOnevisionImageProcessor(size={"height": px, "width": px}, image_grid_pinpoints=c.image_grid_pinpoints)
    tok = tokenizer("<image>", video_token=("<video>", tiny.VIDEO))
    return image_only(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok,
                                               num_image_tokens=(px // c.vision_config.patch_size) ** 2,
                                               vision_feature_select_strategy=c.vision_feature_select_strategy,
                                               vision_aspect_ratio=c.vision_aspect_ratio,
                                               chat_template=template("<image>\n"))


def qwen(model: Any, cls: str = "Qwen2VLProcessor") -> Any:
    import transformers as T

    vc = model.config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    ip = T.Qwen2VLImageProcessor(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                 temporal_patch_size=vc.temporal_patch_size,
                                 size={"shortest_edge": 4 * factor**2, "longest_edge": 40 * factor**2})
    return image_only(getattr(T, cls))(image_processor=ip, tokenizer=tokenizer("<|image_pad|>", **QWEN_TOKENS),
                           chat_template=template(QWEN_SLOT))


def internvl(model: Any) -> Any:
    from transformers import GotOcr2ImageProcessor, InternVLProcessor

    c = model.config
    px = c.vision_config.image_size[0]
    ip = GotOcr2ImageProcessor(size={"height": px, "width": px}, crop_to_patches=True, min_patches=1, max_patches=6)
    tok = tokenizer("<IMG_CONTEXT>", context_image_token=("<IMG_CONTEXT>", tiny.IMAGE),
                    start_image_token=("<img>", tiny.VSTART), end_image_token=("</img>", tiny.VEND),
                    video_token=("<video>", tiny.VIDEO))
    tokens = int((px // c.vision_config.patch_size[0] * c.downsample_ratio) ** 2)
    return image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=tokens,
                             chat_template=template("<IMG_CONTEXT>\n"))


def gemma3(model: Any) -> Any:
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    px = model.config.vision_config.image_size
    tok = tokenizer("<image_soft_token>", boi_token=("<start_of_image>", tiny.VSTART),
                    eoi_token=("<end_of_image>", tiny.VEND))
    return Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": px, "width": px}), tokenizer=tok,
                           image_seq_length=model.config.mm_tokens_per_image,
                           chat_template=template("<start_of_image>"))


def smolvlm(model: Any) -> Any:
    """SmolVLMProcessor without its video processor (torchvision) and num2words (a video's intro text): the
    attributes its __init__ sets, then ProcessorMixin's; image splitting, prompt expansion and batching are its own.
    32 px tiles, the longest side resized to 96 px (3 tiles) as real checkpoints resize it to 4 tiles."""
    import transformers as T
    from transformers import AutoProcessor, ProcessorMixin

    from vtprune.adapters.smolvlm import FAKE, GLOBAL, row_col

    class SmolVLMProcessorImageOnly(T.SmolVLMProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_len=169, chat_template=None, **kwargs):
            self.fake_image_token, self.global_image_token = "<fake_token_around_image>", "<global-img>"
            self.image_token, self.video_token, self.end_of_utterance_token = "<image>", "<video>", "<end_of_utterance>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.image_seq_len = image_seq_len
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        apply_chat_template = ProcessorMixin.apply_chat_template  # SmolVLM's reads the video processor's settings

    AutoProcessor.register("vtprune-test-SmolVLMProcessorImageOnly", SmolVLMProcessorImageOnly, exist_ok=True)
    px = model.config.vision_config.image_size
    ip = T.SmolVLMImageProcessorPil(size={"longest_edge": 3 * px}, max_image_size={"longest_edge": px})
    rows = {f"row_{r}_col_{c}": (f"<row_{r}_col_{c}>", row_col(r, c)) for r in range(1, 7) for c in range(1, 7)}
    tok = tokenizer("<image>", fake_image_token=("<fake_token_around_image>", FAKE),
                    global_image_token=("<global-img>", GLOBAL), **rows)
    return SmolVLMProcessorImageOnly(image_processor=ip, tokenizer=tok, image_seq_len=vtprune.adapter_for(
        model).grid_side ** 2, chat_template=template("<image>"))


def mistral3(model: Any) -> Any:
    """PixtralProcessor with the PIL image processor: its module imports a resize helper from the torchvision image
    processor (absent here) at the top, the PIL module defines the same function. A subclass names the settings
    from_pretrained must pass back (patch_size, spatial_merge_size). Images up to 64 px (the tiny rotary table)."""
    import transformers as T
    from transformers import AutoProcessor
    from transformers.models.pixtral import image_processing_pil_pixtral

    with torchvision_free("transformers.models.pixtral.image_processing_pixtral", image_processing_pil_pixtral):
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    class PixtralProcessorPil(PixtralProcessor):
        def __init__(self, image_processor=None, tokenizer=None, patch_size=16, spatial_merge_size=1,
                     chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, patch_size=patch_size, spatial_merge_size=spatial_merge_size,
                             chat_template=chat_template, **kwargs)

    AutoProcessor.register("vtprune-test-PixtralProcessorPil", PixtralProcessorPil, exist_ok=True)
    c = model.config
    tok = tokenizer("[IMG]", image_break_token=("[IMG_BREAK]", tiny.VSTART), image_end_token=("[IMG_END]", tiny.VEND))
    ip = T.PixtralImageProcessorPil(size={"longest_edge": c.vision_config.image_size})
    return PixtralProcessorPil(image_processor=ip, tokenizer=tok, patch_size=c.vision_config.patch_size,
                               spatial_merge_size=c.spatial_merge_size, chat_template=template("[IMG]"))


def glm4v(model: Any) -> Any:
    """Glm4vProcessor without its video processor (torchvision); its __init__ reads the begin / end of video tokens.
    Its image processor falls back to the PIL one."""
    import transformers as T

    from vtprune.adapters.glm4v import BOI, EOI

    vc = model.config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    ip = T.Glm4vImageProcessor(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                               temporal_patch_size=vc.temporal_patch_size,
                               size={"shortest_edge": 4 * factor**2, "longest_edge": 40 * factor**2})
    tok = tokenizer("<|image|>", video_token=("<|video|>", tiny.VIDEO),
                    video_start_token=("<|begin_of_video|>", tiny.VSTART),
                    video_end_token=("<|end_of_video|>", tiny.VEND), image_start_token=("<|begin_of_image|>", BOI),
                    image_end_token=("<|end_of_image|>", EOI))
    return image_only(T.Glm4vProcessor)(image_processor=ip, tokenizer=tok,
                                        chat_template=template("<|begin_of_image|><|image|><|end_of_image|>"))


def gemma4(model: Any) -> Any:
    """Gemma4Processor without its video processor (torchvision) and audio feature extractor: the attributes its
    __init__ sets, then ProcessorMixin's; resizing, patching and prompt expansion are its own. Its PIL image
    processor; 5.19's processing module imports two names from the torchvision image processor, which the PIL module
    defines alike."""
    import transformers as T
    from transformers import AutoProcessor, ProcessorMixin
    from transformers.models.gemma4 import image_processing_pil_gemma4

    with torchvision_free("transformers.models.gemma4.image_processing_gemma4", image_processing_pil_gemma4):
        from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    class Gemma4ProcessorImageOnly(Gemma4Processor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length=280, **kwargs):
            self.image_seq_length = image_seq_length
            self.image_token, self.image_token_id = tokenizer.image_token, tokenizer.image_token_id
            self.boi_token, self.eoi_token = tokenizer.boi_token, tokenizer.eoi_token
            self.video_token = self.video_token_id = self.audio_token = self.audio_token_id = None
            self.audio_seq_length, self.audio_ms_per_token = 750, 40
            self.boa_token, self.eoa_token = "<boa>", "<eoa>"  # unused; None would trip its validate_inputs
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    AutoProcessor.register("vtprune-test-Gemma4ProcessorImageOnly", Gemma4ProcessorImageOnly, exist_ok=True)
    vc = model.config.vision_config
    ip = T.Gemma4ImageProcessorPil(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                   max_soft_tokens=70)
    tok = tokenizer("<|image|>", boi_token=("<|image>", tiny.VSTART), eoi_token=("<image|>", tiny.VEND))
    return Gemma4ProcessorImageOnly(image_processor=ip, tokenizer=tok, chat_template=template("<|image|>"))


@dataclass(frozen=True)
class Case:
    family: str
    processor: Callable[[Any], Any]
    size: tuple[int, int]  # (W, H) of the picture: non-square, so crops, canvases and tile grids are not trivial


CASES = {
    "llava": Case("llava", llava, (84, 56)),
    "llava_next": Case("llava_next", llava_next, (150, 50)),
    # its image path; LlavaNextVideoProcessor itself needs a video processor, i.e. torchvision, not installed here
    "llava_next_video": Case("llava_next_video", llava_next, (120, 56)),
    "llava_onevision": Case("llava_onevision", llava_onevision, (130, 60)),
    "qwen2_vl": Case("qwen2_vl", qwen, (200, 90)),
    "qwen2_5_vl": Case("qwen2_5_vl", lambda m: qwen(m, "Qwen2_5_VLProcessor"), (200, 90)),
    "qwen3_vl": Case("qwen3_vl", lambda m: qwen(m, "Qwen3VLProcessor"), (200, 90)),
    "internvl": Case("internvl", internvl, (240, 160)),
    "gemma3": Case("gemma3", gemma3, (90, 60)),
    "gemma4": Case("gemma4", gemma4, (90, 60)),
    "glm4v": Case("glm4v", glm4v, (200, 90)),
    "mistral3": Case("mistral3", mistral3, (90, 60)),
    "smolvlm": Case("smolvlm", smolvlm, (90, 60)),
}


def picture(size: tuple[int, int], kind: str = "gradient") -> Any:
    """``gradient``: red grows left to right, green top to bottom (a misplaced region shows); ``grey``: flat 200
    (kept, dropped and unseen pixels are three distinct values)."""
    from PIL import Image

    W, H = size
    if kind == "grey":
        return Image.new("RGB", size, (200, 200, 200))
    x = torch.linspace(0, 255, W)[None, :].expand(H, W)
    y = torch.linspace(0, 255, H)[:, None].expand(H, W)
    rgb = torch.stack([x, y, torch.full((H, W), 128.0)], -1).round().to(torch.uint8)
    return Image.fromarray(rgb.numpy())


@dataclass
class Ckpt:
    case: Case
    dir: Path
    model: Any  # loaded back from ``dir`` as the CLI loads it
    processor: Any

    @property
    def adapter(self) -> Any:
        return vtprune.adapter_for(self.model)


@pytest.fixture(scope="module", params=list(CASES))
def ckpt(request, tmp_path_factory) -> Ckpt:
    case = CASES[request.param]
    model = tiny.build(case.family)
    processor = case.processor(model)
    inputs = encode(processor, picture(case.size), QUESTION)
    with torch.no_grad():  # the model checks that its features fill exactly the processor's placeholders
        model(**inputs)
    out = tmp_path_factory.mktemp(case.family)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    model, processor = _load(str(out), "auto")
    return Ckpt(case, out, model, processor)


def candidates(ckpt: Ckpt) -> int:
    """Visual-token candidates of the case's picture (placeholders minus LLaVA-NeXT's newlines)."""
    with vtprune.prune(ckpt.model, "random", ratio=0.0) as h, torch.no_grad():
        ckpt.model(**encode(ckpt.processor, picture(ckpt.case.size), QUESTION))
        return h.kept_masks()[0].total()


def test_cli_draws_the_family(ckpt, tmp_path, capsys):
    image, png = tmp_path / "picture.png", tmp_path / "show.png"
    picture(ckpt.case.size).save(image)
    keep = 3
    assert main([str(image), "--question", QUESTION, "--model", str(ckpt.dir), "--methods", "random", "kcenter",
                 "fastv:layer=2", "--keep", str(keep), "--out", str(png), "--max-new-tokens", "4"]) == 0
    total = candidates(ckpt)
    assert total > keep
    printed = capsys.readouterr().out
    assert f"unpruned · {total}/{total} tokens" in printed
    for label in ("random", "kcenter", "fastv layer=2"):
        assert f"{label} · {keep}/{total} tokens" in printed, printed
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 300 and im.height > 150
    if os.environ.get("VTPRUNE_SHOW_DIR"):  # keep the figures to look at
        Path(os.environ["VTPRUNE_SHOW_DIR"]).mkdir(parents=True, exist_ok=True)
        png.rename(Path(os.environ["VTPRUNE_SHOW_DIR"]) / f"{ckpt.case.family}.png")


# ============================================================================ geometry against the processor
def masks(ckpt: Ckpt, image: Any) -> tuple[Any, dict[str, Any]]:
    """The unpruned kept masks of ``image`` and the processor's inputs for it."""
    inputs = encode(ckpt.processor, image, QUESTION)
    with vtprune.prune(ckpt.model, "random", ratio=0.0) as h, torch.no_grad():
        ckpt.model(**inputs)
        return h.kept_masks()[0], inputs


def shown(pixels: torch.Tensor, processor: Any) -> torch.Tensor:
    """(3, h, w) normalised pixels back to 0..255."""
    ip = processor.image_processor
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (ip.image_mean, ip.image_std))
    return (pixels.float() * std + mean) * 255


def region(image: Any, box: tuple[float, float, float, float], side: int) -> torch.Tensor:
    """(3, side, side) the part ``box`` (picture units) of ``image``, resized as a processor would."""
    from PIL import Image

    W, H = image.size
    part = image.crop((round(box[0] * W), round(box[1] * H), round(box[2] * W), round(box[3] * H)))
    return torch.tensor(list(part.resize((side, side), Image.BICUBIC).getdata()), dtype=torch.float32).T.reshape(
        3, side, side)


def assert_shows(tile: torch.Tensor, image: Any, box: tuple[float, float, float, float], what: str) -> None:
    """``tile`` (3, s, s; 0..255) is the part ``box`` of the gradient picture ``image``: a region misplaced by a
    tenth of the picture would differ by ~25 grey levels on average."""
    err = (tile - region(image, box, tile.shape[-1])).abs().mean().item()
    assert err < 6, f"{what}: the processor's pixels differ from the picture's box {box} by {err:.1f} on average"


def test_panels_light_exactly_the_kept_cells(ckpt):
    """Drawn with the real processor: every pixel of every panel is bright on a kept cell, dimmed on a dropped one
    and UNSEEN-dim where no grid cell lies (cropped away, padding), up to a 2-px band at cell edges."""
    case, adapter = ckpt.case, ckpt.adapter
    image = picture(case.size, "grey")
    entries = run(ckpt.model, ckpt.processor, image, QUESTION, ["random"], keep=5, max_new_tokens=1)
    W, H = image.size
    for e in entries:
        named = panels([image], e.tokens, adapter, ckpt.processor, e.stage, height=96)
        grids = e.tokens.grids
        boxes = adapter.grid_boxes(len(grids), (W, H), ckpt.processor)
        by_panel: dict[str, list] = {}
        bright = 0
        for g, b in zip(grids, boxes):
            by_panel.setdefault(b.panel, []).append((g, b.box))
        assert [n for n, _ in named] == list(by_panel), case.family
        for (name, img), members in zip(named, by_panel.values()):
            pw, ph = img.size
            x0, y0 = min(0.0, *(b[0] for _, b in members)), min(0.0, *(b[1] for _, b in members))
            x1, y1 = max(1.0, *(b[2] for _, b in members)), max(1.0, *(b[3] for _, b in members))
            u = (torch.arange(pw) + 0.5) / pw * (x1 - x0) + x0  # pixel centres in picture units
            v = (torch.arange(ph) + 0.5) / ph * (y1 - y0) + y0
            want = torch.full((ph, pw), UNSEEN)
            near_edge = torch.zeros(ph, pw, dtype=torch.bool)
            for g, (bx0, by0, bx1, by1) in members:
                h, w = g.shape
                c = torch.floor((u - bx0) / (bx1 - bx0) * w).long()  # cell column of every pixel column
                r = torch.floor((v - by0) / (by1 - by0) * h).long()
                inside = (r[:, None] >= 0) & (r[:, None] < h) & (c[None] >= 0) & (c[None] < w)
                cell = g.final[r.clamp(0, h - 1)][:, c.clamp(0, w - 1)]
                present = g.present[r.clamp(0, h - 1)][:, c.clamp(0, w - 1)]
                light = torch.where(cell, torch.tensor(1.0), torch.tensor(DROPPED))
                if e.stage == 0:
                    light = torch.ones_like(light)
                want = torch.where(inside & present, light, want)
                for edges, axis, n in (((bx0, bx1), u, w), ((by0, by1), v, h)):
                    lines = torch.tensor([edges[0] + (edges[1] - edges[0]) * k / n for k in range(n + 1)])
                    px = ((axis[:, None] - lines[None]).abs() * (pw if axis is u else ph) / (
                        (x1 - x0) if axis is u else (y1 - y0))).min(1).values <= 2
                    near_edge |= px[None] if axis is u else px[:, None]
            on_picture = ((u >= 0) & (u <= 1))[None] & ((v >= 0) & (v <= 1))[:, None]
            base = torch.where(on_picture, torch.tensor(200.0), torch.tensor(float(PAD_GREY)))
            got = torch.tensor(list(img.getdata()), dtype=torch.float32)[:, 0].reshape(ph, pw)
            wrong = (got - (base * want).round()).abs() > 1
            assert not bool((wrong & ~near_edge).any()), (
                f"{case.family} {e.label} panel {name!r}: {int((wrong & ~near_edge).sum())} pixels off "
                f"(first at {(wrong & ~near_edge).nonzero()[0].tolist()})")
            bright += int((got == 200).sum())
        assert bright > 0, f"{case.family} {e.label}: nothing drawn kept"


def only(*families: str) -> Any:
    return pytest.mark.parametrize("ckpt", families, indirect=True)


@only("llava", "gemma3")
def test_a_single_tile_shows_the_seen_box(ckpt):
    """LLaVA-1.5's CLIP processor centre-crops a non-square picture (its sides never reach the model: the
    drawing must leave them UNSEEN-dim); Gemma-3's squashes the whole picture. The box grid_boxes draws is the
    part of the picture the processor's pixels show."""
    image = picture(ckpt.case.size)
    tokens, inputs = masks(ckpt, image)
    (box,) = [b.box for b in ckpt.adapter.grid_boxes(len(tokens.grids), image.size, ckpt.processor)]
    W, H = image.size
    if ckpt.case.family == "llava":
        assert box == pytest.approx((0.5 - H / W / 2, 0.0, 0.5 + H / W / 2, 1.0))  # the central H x H square
        (named,) = panels([picture(image.size, "grey")], tokens, ckpt.adapter, ckpt.processor, height=96)
        side = round(named[1].width * box[0]) - 2  # cropped-away columns, less a resampling pixel
        px = torch.tensor(list(named[1].getdata()), dtype=torch.float32)[:, 0].reshape(96, -1)
        assert bool((px[:, :side] == round(200 * UNSEEN)).all()) and bool((px[:, -side:] == round(200 * UNSEEN)).all())
    else:
        assert box == (0.0, 0.0, 1.0, 1.0)
    assert_shows(shown(inputs["pixel_values"][0], ckpt.processor), image, box, ckpt.case.family)
    side = ckpt.model.config.vision_config.image_size // ckpt.model.config.vision_config.patch_size
    if ckpt.case.family == "llava":  # gemma3 pools its patches: its grid is mm_tokens_per_image's
        assert tokens.grids[0].shape == (side, side)


@only("gemma4")
def test_gemma4_grid_covers_the_whole_picture(ckpt):
    """Gemma-4's processor resizes the whole picture (aspect kept, sides floored to k * patch) and patchifies it:
    its patch rows, put back by their positions, show the box grid_boxes draws (the whole picture), and the token
    grid is the (Hp / k) x (Wp / k) blocks of those patches."""
    image = picture(ckpt.case.size)
    tokens, inputs = masks(ckpt, image)
    (box,) = [b.box for b in ckpt.adapter.grid_boxes(len(tokens.grids), image.size, ckpt.processor)]
    assert box == (0.0, 0.0, 1.0, 1.0)
    vc = ckpt.model.config.vision_config
    p, k = vc.patch_size, vc.pooling_kernel_size
    pos, rows = inputs["image_position_ids"][0], inputs["pixel_values"][0]
    real = (pos != -1).all(-1)
    wp, hp = int(pos[real, 0].max()) + 1, int(pos[real, 1].max()) + 1
    canvas = torch.zeros(hp, wp, p, p, 3)
    canvas[pos[real, 1], pos[real, 0]] = rows[real].reshape(-1, p, p, 3)  # each row a (y, x, channel) patch
    pixels = canvas.permute(4, 0, 2, 1, 3).reshape(3, hp * p, wp * p) * 255  # rescaled to [0, 1], no normalisation
    assert_shows(torch.nn.functional.interpolate(pixels[None], size=(48, 48), mode="area")[0], image, box, "gemma4")
    assert tokens.grids[0].shape == (hp // k, wp // k)


@only("llava_next", "llava_next_video", "llava_onevision")
def test_anyres_canvas_is_the_unpadded_feature_grid(ckpt):
    """The canvas grid is the unpadded (and, for OneVision, possibly down-sampled) feature grid transformers built:
    its rows are the image_newline tokens the model put into the LLM input, its columns the tokens between; it
    shows the whole picture (roughly its aspect ratio), the base tile the whole picture squashed."""
    image = picture(ckpt.case.size)
    embeds = {}

    def grab(module, args, kwargs):  # the LLM input: every image token, newlines included
        embeds.setdefault("x", kwargs["inputs_embeds"])

    hook = ckpt.adapter.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tokens, inputs = masks(ckpt, image)
    finally:
        hook.remove()
    x = embeds["x"][0][inputs["input_ids"][0] == tiny.IMAGE]  # the image's LLM tokens
    newline = (x == ckpt.model.model.image_newline.to(x.dtype)).all(-1)
    base = ckpt.adapter.grid_side ** 2
    assert not bool(newline[:base].any())
    rows = int(newline.sum())
    cols = (x.shape[0] - base - rows) // rows
    assert newline[base:].nonzero()[:, 0].tolist() == [(cols + 1) * (r + 1) - 1 for r in range(rows)]
    assert [g.shape for g in tokens.grids] == [(ckpt.adapter.grid_side,) * 2, (rows, cols)]
    W, H = image.size
    assert 0.6 < (cols / rows) / (W / H) < 1.6, (rows, cols, W, H)  # patch-coarse unpadding of a tiny tower
    boxes = ckpt.adapter.grid_boxes(2, image.size, ckpt.processor)
    assert [b.box for b in boxes] == [(0.0, 0.0, 1.0, 1.0)] * 2
    assert_shows(shown(inputs["pixel_values"][0, 0], ckpt.processor), image, boxes[0].box, "base tile")


@only("internvl")
@pytest.mark.parametrize("size", [(240, 160), (130, 260), (330, 100), (100, 100), (161, 150)])
def test_internvl_tiles_follow_the_processor(ckpt, size):
    """One grid per tile the processor cut; grid_boxes places them in the processor's own cols x rows canvas
    (transformers' get_optimal_tiled_canvas with the processor's min / max tiles), and each tile's pixels are
    that box of the picture; the thumbnail (last) is the whole picture."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    image = picture(size)
    tokens, inputs = masks(ckpt, image)
    ip = ckpt.processor.image_processor
    pixels = inputs["pixel_values"]
    assert pixels.shape[0] == len(tokens.grids)
    W, H = size
    cols, rows = get_optimal_tiled_canvas((H, W), (ip.size["height"], ip.size["width"]), ip.min_patches,
                                          ip.max_patches)
    boxes = ckpt.adapter.grid_boxes(len(tokens.grids), size, ckpt.processor)
    if cols * rows == 1:
        assert len(tokens.grids) == 1 and boxes[0].box == (0.0, 0.0, 1.0, 1.0)
    else:
        assert len(tokens.grids) == cols * rows + 1
        want = [(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)]
        assert torch.allclose(torch.tensor([b.box for b in boxes]), torch.tensor([*want, (0.0, 0.0, 1.0, 1.0)]))
        assert [b.panel for b in boxes] == ["tiles"] * (cols * rows) + ["thumbnail"]
    for t, b in enumerate(boxes):
        assert_shows(shown(pixels[t], ckpt.processor), image, b.box, f"{size} tile {t}")


@only("smolvlm")
@pytest.mark.parametrize("size", [(90, 60), (40, 100), (100, 100), (20, 30)])
def test_smolvlm_tiles_follow_the_processor(ckpt, size):
    """One grid per tile the processor cut (its rows x cols, raster, then the global view); grid_boxes places each
    tile at its box of the picture, whose pixels the tile shows; the global view is the whole picture."""
    image = picture(size)
    tokens, inputs = masks(ckpt, image)
    _, rows, cols = ckpt.processor.image_processor.get_number_of_image_patches(size[1], size[0])
    pixels = inputs["pixel_values"][0]  # (tiles, 3, 32, 32)
    assert pixels.shape[0] == len(tokens.grids) == (rows * cols + 1 if rows else 1)
    assert all(g.shape == (ckpt.adapter.grid_side,) * 2 for g in tokens.grids)
    boxes = ckpt.adapter.grid_boxes(len(tokens.grids), size, ckpt.processor)
    want = [(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)]
    assert torch.allclose(torch.tensor([b.box for b in boxes]), torch.tensor([*want, (0.0, 0.0, 1.0, 1.0)]))
    assert [b.panel for b in boxes] == (["tiles"] * (rows * cols) + ["global view"] if rows else [""])
    for t, b in enumerate(boxes):
        assert_shows(shown(pixels[t], ckpt.processor), image, b.box, f"{size} tile {t}")


@only("mistral3")
@pytest.mark.parametrize("size", [(90, 60), (30, 70), (64, 64), (20, 12)])
def test_pixtral_grid_is_the_resized_picture(ckpt, size):
    """One grid of image_sizes // (patch * merge) showing the whole picture (resized, never cropped or padded), put
    in the prompt as the processor's rows of [IMG] closed by [IMG_BREAK] / [IMG_END]: the tiny prompt's layout."""
    from PIL import Image

    image = picture(size)
    tokens, inputs = masks(ckpt, image)
    c = ckpt.model.config
    f = c.vision_config.patch_size * c.spatial_merge_size
    H, W = inputs["image_sizes"][0].tolist()
    assert [g.shape for g in tokens.grids] == [(H // f, W // f)]
    assert max(H, W) <= c.vision_config.image_size and 0.7 < (W / H) / (size[0] / size[1]) < 1.4
    ids = inputs["input_ids"][0].tolist()
    assert ids[ids.index(tiny.IMAGE): ids.index(tiny.VEND) + 1] == ckpt.adapter.tiny_image((H, W), seed=0)[0]
    assert [b.box for b in ckpt.adapter.grid_boxes(1, size, ckpt.processor)] == [(0.0, 0.0, 1.0, 1.0)]
    whole = torch.tensor(list(image.resize((W, H), Image.BICUBIC).getdata()), dtype=torch.float32).T.reshape(3, H, W)
    err = (shown(inputs["pixel_values"][0, :, :H, :W], ckpt.processor) - whole).abs().mean().item()
    assert err < 6, f"the processor's pixels differ from the whole picture by {err:.1f} on average"


@only("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v")
def test_qwen_grid_is_the_merged_patch_grid(ckpt):
    """One grid of (resized H / patch / merge) x (resized W / patch / merge) from the processor's image_grid_thw,
    over the whole picture (Qwen resizes, keeping the aspect ratio to a multiple of patch * merge, never crops)."""
    image = picture(ckpt.case.size)
    tokens, inputs = masks(ckpt, image)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    merge = ckpt.model.config.vision_config.spatial_merge_size
    assert t == 1 and [g.shape for g in tokens.grids] == [(h // merge, w // merge)]
    W, H = image.size
    assert 0.7 < (w / h) / (W / H) < 1.4
    assert [b.box for b in ckpt.adapter.grid_boxes(1, image.size, ckpt.processor)] == [(0.0, 0.0, 1.0, 1.0)]


def test_lmms_eval_generic_model_batches_each_prompts_images(ckpt):
    """The generic lmms-eval model (``vtprune`` / ``HFVisionLanguageModel``) through the family's real processor:
    lmms-eval requests for two documents with pictures of different sizes, answered pruned at batch size 2, get the
    answers they get one at a time (each prompt gets its own images: SmolVLM's processor reads a flat image list as
    one prompt's, and so do Gemma-3's and Gemma-4's)."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from vtprune.integrations.lmms_eval import VTPruneHF

    W, H = ckpt.case.size
    docs = [{"q": QUESTION, "image": picture((W, H))},
            {"q": "Is it red ? Answer in one word .", "image": picture((H + 8, W), "grey")}]
    requests = [Instance("generate_until", (d["q"], {"max_new_tokens": 3}, lambda doc: [doc["image"]], i, "t", "test"),
                         idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]

    def answers(batch_size: int) -> list[str]:
        lm = VTPruneHF(pretrained=str(ckpt.dir), method="kcenter", ratio=0.5, device="cpu", dtype="float32",
                       batch_size=batch_size)
        lm.task_dict = {"t": {"test": docs}}
        return lm.generate_until(requests)

    assert answers(2) == answers(1)
