"""Tiny random checkpoints on disk, complete enough for any host to load (config, safetensors, tokenizer,
processor, chat template): what the vLLM plugin's tests compare against transformers.

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


def _qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {QWEN_SPECIALS.get(i, f"w{i}"): i for i in range(tiny.VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w5"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(cleanup=False)
    tk.add_special_tokens(list(QWEN_SPECIALS.values()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="w5", model_max_length=4096, clean_up_tokenization_spaces=False,
                                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                        "vision_bos_token": "<|vision_start|>",
                                                        "vision_eos_token": "<|vision_end|>"})
    tok.chat_template = QWEN_TEMPLATE
    return tok


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
