"""Offline tokenizer, image processor and ``LlavaProcessor`` for the synthetic VQA task (nothing is downloaded).

The tokenizer is word level over ``scenes.vocabulary()``: words are split on whitespace only, so region names
such as ``top-left`` and the role tags ``USER:`` / ``ASSISTANT:`` are single tokens. ``<image>`` is a special token,
so it is never split, and the processor expands it to 576 copies (336 px / patch 14, CLS dropped).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from vtprune.synthetic import scenes

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIALS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE)

# LLaVA-1.5 conversation format. A system prompt is left out: it would only add tokens the task never uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt(question: str) -> str:
    """The prompt for one question, as the chat template renders it with ``add_generation_prompt=True``."""
    return f"USER: <image>\n{question} ASSISTANT:"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: ids 0-4 are the specials, then the task vocabulary; BOS prepended, left padding."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *scenes.vocabulary()])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(cleanup=False)  # word-level decoding: tokens joined by single spaces
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tk.add_special_tokens(list(SPECIALS))  # without this the pre-tokenizer would see "<image>" as a word
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="left",  # decoder-only batches are left padded so every row ends at its answer position
        model_max_length=1024, clean_up_tokenization_spaces=False,  # decode(encode(q)) == q, " ?" included
        extra_special_tokens={"image_token": IMAGE},
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor() -> CLIPImageProcessor:
    """CLIP-style preprocessing at 336 px with mean = std = 0.5 (pixels map to [-1, 1])."""
    size = scenes.IMAGE_SIZE
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def build_processor() -> LlavaProcessor:
    """``LlavaProcessor`` that expands ``<image>`` to (336 / 14)^2 = 576 tokens (CLS counted, then dropped)."""
    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=build_tokenizer(), patch_size=scenes.PATCH,
        vision_feature_select_strategy="default", image_token=IMAGE, num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
