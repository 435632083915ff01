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
VIDEO = "<video>"  # the video model's placeholder (LLaVA-NeXT-Video's), after the image vocabulary

# LLaVA-1.5 conversation format. A system prompt is left out: it would only add tokens the task never uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
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


def video_vocabulary() -> list[str]:
    """Every word of a ``vtprune.synthetic_video`` question as ``vtprune video-qa`` asks it (question, lettered
    options, letter instruction; split on whitespace, so "left?" is one word) and of its answers, minus the image
    vocabulary; sorted."""
    from vtprune import synthetic_video as sv
    from vtprune.video_qa import LETTERS, MC_INSTRUCTION

    colours, dirs = list(sv.COLOURS), list(sv.DIRECTIONS)
    texts = [*(f"Which colour moves {d}?" for d in dirs),
             *(f"Which direction does the {c} {s} move?" for c in colours for s in sv.SHAPES),
             "How many objects appear in the video?", "Which colour appears first?",
             *(f"What shape is the {c} object?" for c in colours), MC_INSTRUCTION,
             *(f"{letter}." for letter in LETTERS[:4]), *colours, *dirs, *sv.SHAPES, *(str(i) for i in range(1, 7))]
    return sorted({w for t in texts for w in t.split()} - set(scenes.vocabulary()))


def build_tokenizer(video: bool = False) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: ids 0-4 are the specials, then the task vocabulary; BOS prepended, left padding.

    ``video``: also ``<video>`` and :func:`video_vocabulary` after it (the image ids are unchanged, so the video
    model can start from the image model's embeddings)."""
    words = [*SPECIALS, *scenes.vocabulary(), *((VIDEO, *video_vocabulary()) if video else ())]
    vocab = {tok: i for i, tok in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(cleanup=False)  # word-level decoding: tokens joined by single spaces
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # without this the pre-tokenizer would see "<image>" as a word
    tk.add_special_tokens([*SPECIALS, *((VIDEO,) if video else ())])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="left",  # decoder-only batches are left padded so every row ends at its answer position
        model_max_length=2048 if video else 1024,  # decode(encode(q)) == q, " ?" included
        clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": IMAGE, **({"video_token": VIDEO} if video else {})},
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
