"""Shared helpers for methods that read the instruction: MMTok's keyword extraction and text relevance."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vtprune.signals import Signals

# MMTok (Ironieser/MMTok, core/text_processor.py): words removed before embedding the question.
STOP_WORDS = frozenset("""
a an the is are was were be been being have has had do does did it they he she we you i
what where when why how who which and or but so if then question answer to for with by from at into onto upon
""".split())
# LLaVA evaluation suffixes MMTok strips before extracting keywords.
SUFFIXES = ("Answer the question using a single word or phrase.",
            "Answer with the option's letter from the given choices directly.")
DEFAULT_QUESTION = "What do you see in this image?"


def keywords(text: str) -> str:
    """MMTok's keyword string of a question: suffixes stripped, ``\\b\\w+\\b`` words, stop words dropped
    (the stripped text is kept when nothing survives)."""
    for suffix in SUFFIXES:
        text = text.replace(suffix, "")
    text = text.strip() or DEFAULT_QUESTION
    words = [w for w in re.findall(r"\b\w+\b", text) if w.lower() not in STOP_WORDS]
    return " ".join(words) if words else text


def instruction_embeddings(sig: Signals, tokenizer: Any | None) -> tuple[torch.Tensor, torch.Tensor]:
    """((S, T, D), mask) embeddings of each span's instruction. With a tokenizer: MMTok's keywords,
    re-tokenised word by word and embedded with the LLM's table (BOS dropped); without one: the embeddings
    of every text token after the visual tokens (template words included)."""
    if tokenizer is None:
        return sig.instruction
    ids, mask = sig.instruction_ids  # (S, T)
    embed: Callable[[torch.Tensor], torch.Tensor] = sig.embed_tokens
    rows = []
    for s in range(ids.shape[0]):
        text = tokenizer.decode(ids[s][mask[s]].tolist(), skip_special_tokens=True)
        words = keywords(text).split()
        enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        if len(enc) > 1 and enc[0] == bos:
            enc = enc[1:]
        rows.append(torch.tensor(enc or [tokenizer.unk_token_id or 0], dtype=torch.long))
    T = max(len(r) for r in rows)
    out_ids = torch.zeros(len(rows), T, dtype=torch.long)
    out_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for s, r in enumerate(rows):
        out_ids[s, : len(r)], out_mask[s, : len(r)] = r, True
    weight = embed.weight if hasattr(embed, "weight") else None
    device = weight.device if weight is not None else ids.device
    return embed(out_ids.to(device)).to(sig.device), out_mask.to(sig.device)


def text_coverage(z: torch.Tensor, z_mask: torch.Tensor, x: torch.Tensor, tau: float) -> torch.Tensor:
    """MMTok's text->vision matrix P (S, T, N): per instruction token, a softmax over the visual tokens of
    cosine / tau, divided by the number of instruction tokens m; padded rows are zero."""
    zn = F.normalize(z.float(), dim=-1, eps=1e-8)  # (S, T, D)
    xn = F.normalize(x.float(), dim=-1, eps=1e-8)  # (S, N, D)
    p = ((zn @ xn.transpose(1, 2)) / tau).softmax(-1)  # (S, T, N)
    m = z_mask.sum(1, keepdim=True).clamp(min=1).float()  # (S, 1)
    return p * z_mask[..., None].float() / m[..., None]
