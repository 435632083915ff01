"""Video inputs for the random tiny models of ``vtprune.testing.tiny``: a word-level tokenizer whose special ids
match theirs, and a :class:`~vtprune.video.inputs.VideoInputBuilder` sized for their small vision towers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vtprune.video.inputs import FramePreprocessor, VideoInputBuilder, video_format


def tiny_tokenizer(words: Sequence[str], family: str) -> Any:
    """A word-level tokenizer over ``words`` whose special ids match ``vtprune.testing.tiny``
    (0 pad, 1 BOS, 2 EOS, 500 image, 501 video, 502 / 503 vision start / end); words take ids 4..499
    (3 is unknown; words past the 496th map to it) and the ids left over decode as ``#<id>``, so whatever
    a random model generates reads as something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vtprune.testing import tiny

    fmt = video_format(family)
    video, start, end, image = fmt.video_token, fmt.vision_start, fmt.vision_end, fmt.image_token
    specials = {"<pad>": tiny.PAD, "<s>": tiny.BOS, "</s>": tiny.EOS, "<unk>": 3, image: tiny.IMAGE, video: tiny.VIDEO}
    if start:
        specials |= {start: tiny.VSTART, end: tiny.VEND}
    vocab = dict(specials)
    for w in dict.fromkeys(words):  # first occurrence order: deterministic for a given word list
        if w not in vocab and len(vocab) - len(specials) < tiny.IMAGE - 4:
            vocab[w] = 4 + len(vocab) - len(specials)
    for i in range(4 + len(vocab) - len(specials), tiny.IMAGE):
        vocab[f"#{i}"] = i  # never produced by encoding (the pre-tokenizer splits "#"), only by generation
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    model.decoder = decoders.WordPiece(cleanup=False)  # joins words with single spaces
    model.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"video_token": video, "image_token": image})


def tiny_words(texts: Sequence[str]) -> list[str]:
    """The word list :func:`tiny_tokenizer` needs to cover ``texts`` (plus option letters and role tags)."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = ["USER", ":", "ASSISTANT", ".", *"ABCDEFGHIJ", *"0123456789", "<", ">", "seconds"]  # + Qwen3 times
    for t in texts:
        words += [w for w, _ in split.pre_tokenize_str(t)]
    return list(dict.fromkeys(words))


def tiny_builder(model: Any, texts: Sequence[str] = (), side: int | None = None,
                 frames: int = 8) -> VideoInputBuilder:
    """A :class:`VideoInputBuilder` for a ``vtprune.testing.tiny`` model, its vocabulary covering ``texts``.

    The prompt is ``USER: <video>\\n{question} ASSISTANT:`` (Qwen: the placeholder wrapped in vision start
    / end). Frames are sized for the tiny vision towers (see :meth:`FramePreprocessor.for_model`).
    """
    family = model.config.model_type
    fmt = video_format(family)
    video, start, end = fmt.video_token, fmt.vision_start, fmt.vision_end
    slot = f"{start}{video}{end}" if start else f"{video}\n"
    template = ("{% for m in messages %}USER: {% for p in m['content'] %}{% if p['type'] == 'video' %}" + slot +
                "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    return VideoInputBuilder(family, tiny_tokenizer(tiny_words(texts), family),
                             FramePreprocessor.for_model(model, side, frames), chat_template=template,
                             **fmt.builder_kwargs(model.config))
