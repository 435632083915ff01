"""Tiny random checkpoints on disk, complete enough for any host to load (config, safetensors, tokenizer,
processor, chat template): what the vLLM plugin's tests compare against transformers.

* ``llava_next``: the tiny LLaVA-NeXT (56 px CLIP tiles, AnyRes up to 112 x 112) with a word-level tokenizer and
  LLaVA-NeXT's processor.
* ``llava_onevision``: the tiny LLaVA-OneVision (56 px SigLIP tiles, AnyRes-max-9 with down-sampling, pooled video
  frames) with a word-level tokenizer and OneVision's image and video processors.
* ``internvl``: the tiny HF-native InternVL (112 px tiles of 16 tokens, the LLM widened to head_dim 32) with a
  word-level tokenizer carrying InternVL's ``<img>`` / ``</img>`` / ``<IMG_CONTEXT>`` / ``<video>`` at the tiny
  model's token ids, and InternVL's image (up to 4 tiles + thumbnail) and video processors.

* ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``: the tiny Qwen-VL models of :mod:`vtprune.testing.tiny` (the LLM
  widened to head_dim 32, which vLLM's CPU attention needs) with a word-level tokenizer whose specials sit at the tiny
  model's token ids (``<|image_pad|>`` = 500, ...), Qwen's image / video processors at small pixel budgets, and a
  Qwen-style chat template.
"""

from __future__ import annotations

from pathlib import Path

from vtprune.testing import tiny

QWEN_SPECIALS = {tiny.PAD: "<|endoftext|>", tiny.BOS: "<|im_start|>", tiny.EOS: "<|im_end|>",
                 tiny.IMAGE: "<|image_pad|>", tiny.VIDEO: "<|video_pad|>", tiny.VSTART: "<|vision_start|>",
                 tiny.VEND: "<|vision_end|>"}
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _word_tokenizer(specials: dict[int, str], named: dict[str, str], template: str):
    """A word-level tokenizer over the tiny vocabulary (``w<i>``) with ``specials`` at their token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {specials.get(i, f"w{i}"): i for i in range(tiny.VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w5"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(cleanup=False)
    tk.add_special_tokens(list(specials.values()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="w5", model_max_length=4096, clean_up_tokenization_spaces=False,
                                  extra_special_tokens=named)
    tok.chat_template = template
    return tok


def _qwen_tokenizer():
    return _word_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                           "vision_bos_token": "<|vision_start|>",
                                           "vision_eos_token": "<|vision_end|>"}, QWEN_TEMPLATE)


def save_qwen(family: str, path: str | Path, *, seed: int = 0, text_layers: int = 3) -> Path:
    """The tiny Qwen-VL of ``family`` ("qwen2_vl" / "qwen2_5_vl" / "qwen3_vl") with its tokenizer and processor in
    ``path`` (images of 56 x 56 to 224 x 224 pixels)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    processors = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}
    if family not in processors:
        raise ValueError(f"save_qwen: family={family!r}; allowed: {', '.join(processors)}")

    def wider(cfg) -> None:  # vLLM's CPU attention kernels need head_dim >= 32
        t = cfg.text_config
        t.hidden_size, t.intermediate_size = 128, 256
        if family == "qwen3_vl":
            t.head_dim = 32
            t.rope_parameters = {**t.rope_parameters, "mrope_section": [6, 5, 5]}
        else:
            t.rope_parameters = {**t.rope_parameters, "mrope_section": [4, 6, 6]}
        if family == "qwen2_vl":
            cfg.vision_config.hidden_size = 128  # Qwen2-VL: the merger's output width
        else:
            cfg.vision_config.out_hidden_size = 128

    path = Path(path)
    model = tiny.build(family, seed=seed, text_layers=text_layers, edit=wider)
    model.config.text_config.bos_token_id = None
    model.save_pretrained(path)
    patch = 16 if family == "qwen3_vl" else 14
    unit = (2 * patch) ** 2  # pixels of one merged token
    # Qwen3-VL normalises images and videos alike (mean = std = 0.5), and vLLM normalises both with one module
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    image = Qwen2VLImageProcessor(min_pixels=unit * 4, max_pixels=unit * 64, patch_size=patch, merge_size=2,
                                  temporal_patch_size=2, **norm)
    if family == "qwen3_vl":  # its bound is on the whole clip (frames x pixels)
        video = Qwen3VLVideoProcessor(size={"shortest_edge": unit * 4, "longest_edge": unit * 64}, patch_size=patch,
                                      merge_size=2, temporal_patch_size=2)
    else:
        video = Qwen2VLVideoProcessor(min_pixels=unit * 4, max_pixels=unit * 16, patch_size=patch, merge_size=2,
                                      temporal_patch_size=2)
    processor = processors[family](image_processor=image, tokenizer=_qwen_tokenizer(), video_processor=video,
                                   chat_template=QWEN_TEMPLATE)
    processor.save_pretrained(path)
    return path


INTERNVL_SPECIALS = {**QWEN_SPECIALS, tiny.IMAGE: "<IMG_CONTEXT>", tiny.VIDEO: "<video>", tiny.VSTART: "<img>",
                     tiny.VEND: "</img>"}
INTERNVL_TEMPLATE = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n").replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")


def save_internvl(path: str | Path, *, seed: int = 0, text_layers: int = 3) -> Path:
    """The tiny InternVL (HF-native ``InternVLForConditionalGeneration``: 112 px tiles of 16 tokens, up to 4 tiles
    plus a thumbnail) with its tokenizer and processor in ``path``."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    def wider(cfg) -> None:  # vLLM's CPU attention kernels need head_dim >= 32
        cfg.text_config.hidden_size, cfg.text_config.intermediate_size = 128, 256

    path = Path(path)
    model = tiny.build("internvl", seed=seed, text_layers=text_layers, edit=wider)
    model.config.text_config.bos_token_id = None
    model.save_pretrained(path)
    px = model.config.vision_config.image_size
    px = px[0] if isinstance(px, (list, tuple)) else px
    side = {"height": px, "width": px}
    per_tile = int((px // model.config.vision_config.patch_size[0]) ** 2 * model.config.downsample_ratio ** 2)
    tok = _word_tokenizer(INTERNVL_SPECIALS, {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                                              "end_image_token": "</img>", "video_token": "<video>"},
                          INTERNVL_TEMPLATE)
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=side, crop_to_patches=True, min_patches=1, max_patches=4),
        tokenizer=tok, video_processor=InternVLVideoProcessor(size=side), chat_template=INTERNVL_TEMPLATE,
        image_seq_length=per_tile)
    processor.save_pretrained(path)
    return path


LLAVA_SPECIALS = {tiny.PAD: "<pad>", tiny.BOS: "<s>", tiny.EOS: "</s>", tiny.IMAGE: "<image>"}
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def save_llava_next(path: str | Path, *, seed: int = 0, text_layers: int = 3) -> Path:
    """The tiny LLaVA-NeXT (CLIP tiles of 56 px = 4 x 4 patches, AnyRes pinpoints up to 112 x 112, the LLM widened to
    head_dim 32) with a word-level tokenizer and LLaVA-NeXT's processor in ``path``."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    pinpoints = [[56, 112], [112, 56], [112, 112]]

    def edit(cfg) -> None:
        t = cfg.text_config
        t.hidden_size, t.intermediate_size, t.head_dim = 128, 256, 32  # head_dim 32 for vLLM's CPU kernels
        cfg.vision_config.image_size, cfg.image_grid_pinpoints = 56, pinpoints

    path = Path(path)
    from vtprune.synthetic.model import canonical_llava_layout

    model = tiny.build("llava_next", seed=seed, text_layers=text_layers, edit=edit)
    model.save_pretrained(path)
    canonical_llava_layout(path)  # vision_tower.vision_model.*, which vLLM loads
    tok = _word_tokenizer({**LLAVA_SPECIALS}, {"image_token": "<image>"}, LLAVA_TEMPLATE)
    tok.eos_token, tok.pad_token = "</s>", "<pad>"
    image = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                    image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                       image_token="<image>", num_additional_image_tokens=1,
                       chat_template=LLAVA_TEMPLATE).save_pretrained(path)
    return path


def save_llava_onevision(path: str | Path, *, seed: int = 0, text_layers: int = 3) -> Path:
    """The tiny LLaVA-OneVision (SigLIP tiles of 56 px = 4 x 4 patches, AnyRes-max-9 pinpoints up to 224 x 224 so a
    large canvas is down-sampled, videos of 56 px frames pooled to 2 x 2; the LLM widened to head_dim 32) with a
    word-level tokenizer and OneVision's processors in ``path``."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    from vtprune.synthetic.model import canonical_llava_layout

    def edit(cfg) -> None:
        cfg.text_config.hidden_size, cfg.text_config.intermediate_size = 128, 256  # head_dim 32 for vLLM's kernels

    path = Path(path)
    model = tiny.build("llava_onevision", seed=seed, text_layers=text_layers, edit=edit)
    model.save_pretrained(path)
    canonical_llava_layout(path)
    px = model.config.vision_config.image_size
    side = {"height": px, "width": px}
    template = LLAVA_TEMPLATE.replace("<image>\n{% else %}",
                                      "<image>\n{% elif c['type'] in ('video', 'video_url') %}<video>\n{% else %}")
    tok = _word_tokenizer({**LLAVA_SPECIALS, tiny.VIDEO: "<video>"},
                          {"image_token": "<image>", "video_token": "<video>"}, template)
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=model.config.image_grid_pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=side), tokenizer=tok,
        num_image_tokens=(px // model.config.vision_config.patch_size) ** 2, vision_feature_select_strategy="full",
        chat_template=template).save_pretrained(path)
    return path
