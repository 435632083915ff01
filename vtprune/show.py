"""``vtprune show``: see what survives. One PNG with the picture and, per method, the picture with the kept
visual tokens bright and the dropped ones dimmed (merged tokens outlined), the model's answer and the kept count.

    vtprune show                                             # a held-out synthetic scene, the embedded model
    vtprune show photo.jpg --question "What is on the table?" --methods kcenter cls_attention fastv:layer=2 \\
        --keep 64 --model /models/llava-1.5-7b-hf --out show.png

Every family draws in its own geometry (:meth:`~vtprune.adapters.base.Adapter.grid_boxes`): LLaVA-1.5's grid
over the processor's centre crop (or pad-to-square canvas), LLaVA-NeXT / OneVision's base tile and AnyRes canvas
as two panels, InternVL's tiles over the picture plus the thumbnail, Qwen's merged 2x2 grid, a video's frames
side by side. In-LLM methods show the tokens reaching the last decoder layer (``--stage all``: one row per stage).

:func:`panels` and :func:`figure` draw any :class:`~vtprune.masks.ImageTokens`; ``vtprune eval`` and
``vtprune video-qa`` use them for ``--save-overlays``.
"""

from __future__ import annotations

import argparse
import io
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtprune.masks import ImageTokens, TokenGrid

DROPPED = 0.22  # brightness left to a dropped token's patch
UNSEEN = 0.10  # ... to what the model never saw (cropped away, or cells a grid does not have)
PAD_GREY = 110  # the processor's padding, where it pads
MERGED_RGB = (255, 140, 0)  # outline of a kept token that carries merged tokens


@dataclass
class Entry:
    """One row of a figure: a configuration's tokens on one image and what the model answered."""

    label: str
    tokens: ImageTokens
    answer: str = ""
    stage: int = -1  # which stage of ``tokens`` to draw (-1: the last; 0: the prompt, i.e. unpruned)
    notes: list[str] = field(default_factory=list)
    pictures: list[Any] | None = None  # this entry's own pictures (default: the figure's)

    def caption(self) -> str:
        t = self.tokens
        kept = f"{t.kept(self.stage)}/{t.total()} tokens"
        answer = f" · answer: {self.answer!r}" if self.answer != "" else ""
        return f"{self.label} · {kept}{answer}"

    def schedule(self) -> str:
        """'vision 96 → layer:2 32' for a multi-stage method drawn at its last stage ('' otherwise)."""
        t = self.tokens
        if len(t.stages) <= 2 or self.stage not in (-1, len(t.stages) - 1):
            return ""
        return " → ".join(f"{st.split(' ')[0]} {t.kept(s)}" for s, st in enumerate(t.stages) if s)


def _to_pil(picture: Any) -> Any:
    from PIL import Image

    if isinstance(picture, Image.Image):
        return picture.convert("RGB")
    arr = picture.detach().cpu() if torch.is_tensor(picture) else torch.as_tensor(picture)
    if arr.dim() == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # (C, H, W) -> (H, W, C)
        arr = arr.permute(1, 2, 0)
    if arr.is_floating_point():
        arr = (arr.clamp(0, 1) * 255).round()
    return Image.fromarray(arr.to(torch.uint8).numpy()).convert("RGB")


def panels(pictures: Sequence[Any], tokens: ImageTokens, adapter: Any, processor: Any = None, stage: int = -1,
           height: int = 224) -> list[tuple[str, Any]]:
    """(name, PIL image) per panel of one image or video: each grid's cells over the part of the picture they
    show, kept bright, dropped dimmed, merged outlined. ``pictures``: the image, or one picture per frame of
    ``tokens`` (a video's sampled frames; for Qwen, one per temporal patch)."""
    pics = [_to_pil(p) for p in pictures]
    out = []
    for f in range(tokens.frames):
        grids = [g for g in tokens.grids if g.frame == f]
        pic = pics[min(f, len(pics) - 1)]
        by_panel: dict[str, list[tuple[TokenGrid, tuple[float, float, float, float]]]] = {}
        for g, b in zip(grids, adapter.grid_boxes(len(grids), pic.size, processor)):
            by_panel.setdefault(b.panel, []).append((g, b.box))
        for name, members in by_panel.items():
            label = name if tokens.frames == 1 else (f"frame {f}" + (f" {name}" if name else ""))
            out.append((label, _panel(pic, members, stage, height)))
    return out


def _panel(pic: Any, members: list[tuple[TokenGrid, tuple[float, float, float, float]]], stage: int,
           height: int) -> Any:
    """One panel: the picture (and the padding around it, if a grid reaches beyond it) with its grids' cells."""
    from PIL import Image, ImageDraw

    W, H = pic.size
    # the panel spans the picture and every grid's box (a pad-to-square canvas reaches beyond the picture)
    x0, y0 = min(0.0, *(b[0] for _, b in members)), min(0.0, *(b[1] for _, b in members))
    x1, y1 = max(1.0, *(b[2] for _, b in members)), max(1.0, *(b[3] for _, b in members))
    ph, pw = height, max(1, round(height * (x1 - x0) * W / ((y1 - y0) * H)))
    xs = lambda x: round((x - x0) * pw / (x1 - x0))  # noqa: E731 - picture units -> panel pixels
    ys = lambda y: round((y - y0) * ph / (y1 - y0))  # noqa: E731
    canvas = Image.new("RGB", (pw, ph), (PAD_GREY,) * 3)
    canvas.paste(pic.resize((max(1, xs(1) - xs(0)), max(1, ys(1) - ys(0))), Image.BICUBIC), (xs(0), ys(0)))
    light = torch.full((ph, pw), UNSEEN)  # brightness per pixel
    outlines = []
    for g, (bx0, by0, bx1, by1) in members:
        h, w = g.shape
        cols = [xs(bx0 + (bx1 - bx0) * c / w) for c in range(w + 1)]  # cell edges in pixels
        rows = [ys(by0 + (by1 - by0) * r / h) for r in range(h + 1)]
        keep, merged = g.kept[stage], g.merged[stage]
        for r, c in g.present.nonzero().tolist():
            a, b, e, d = max(cols[c], 0), max(rows[r], 0), max(cols[c + 1], 0), max(rows[r + 1], 0)
            light[b:d, a:e] = 1.0 if bool(keep[r, c]) else DROPPED
            if bool(merged[r, c]):
                outlines.append((a, b, e - 1, d - 1))
    rgb = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(ph, pw, 3).float()
    img = Image.fromarray((rgb * light[..., None]).round().clamp(0, 255).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(img)
    for box in outlines:
        draw.rectangle(box, outline=MERGED_RGB, width=max(1, height // 200))
    return img


def strip(named: list[tuple[str, Any]], gap: int = 6, per_row: int = 8) -> Any:
    """Panels side by side on white, ``per_row`` to a row (a long video wraps), each named above when there are
    several."""
    from PIL import Image, ImageDraw

    labelled = len(named) > 1 or any(n for n, _ in named)
    top = 14 if labelled else 0
    lines = [named[i:i + per_row] for i in range(0, len(named), per_row)]
    width = max(sum(im.width for _, im in line) + gap * (len(line) - 1) for line in lines)
    heights = [max(im.height for _, im in line) + top for line in lines]
    out = Image.new("RGB", (width, sum(heights) + gap * (len(lines) - 1)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    y = 0
    for line, h in zip(lines, heights):
        x = 0
        for name, im in line:
            out.paste(im, (x, y + top))
            if labelled:
                draw.text((x + 2, y + 1), name, fill=(0, 0, 0))
            x += im.width + gap
        y += h + gap
    return out


def figure(pictures: Sequence[Any], entries: list[Entry], adapter: Any, path: str | Path, processor: Any = None,
           title: str = "", height: int = 224, dpi: int = 110) -> Path:
    """One PNG: per entry, its panels (the first entry is usually the unpruned model, ``stage=0``) and a caption
    with the kept count and the answer. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strips = [strip(panels(e.pictures or pictures, e.tokens, adapter, processor, e.stage, height)) for e in entries]
    wide = max(s.width / s.height for s in strips) > 1.6
    cols = 1 if wide else min(4, len(entries))
    rows = math.ceil(len(entries) / cols)
    aspect = max(s.width / s.height for s in strips)
    cell_w = 3.2 * aspect if not wide else min(16.0, 2.6 * aspect)
    cell_h = (cell_w / aspect) + 0.75
    fig, axes = plt.subplots(rows, cols, figsize=(cell_w * cols, cell_h * rows + (0.4 if title else 0)),
                             squeeze=False)
    chars = max(24, int(cell_w * 11))
    for ax, e, s in zip(axes.flat, entries, strips):
        ax.imshow(s)
        ax.set_title("\n".join(textwrap.wrap(e.caption(), chars)[:3] + [x for x in (e.schedule(), *e.notes) if x]),
                     fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(entries):]:
        ax.axis("off")
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, int(cell_w * cols * 10))), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi)
    plt.close(fig)
    from PIL import Image

    # a 256-colour palette: a third of the bytes (noisy pictures barely compress as RGB), no visible loss
    Image.open(buf).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


# ============================================================================ running methods on one image
def _load(model_dir: str, dtype: str) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def encode(processor: Any, image: Any, question: str) -> dict[str, Any]:
    """The processor's inputs for one image and one question, rendered with its chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


@torch.inference_mode()
def answer(model: torch.nn.Module, processor: Any, inputs: dict[str, Any], max_new_tokens: int) -> str:
    tok = getattr(processor, "tokenizer", processor)
    seq = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(model: torch.nn.Module, processor: Any, image: Any, question: str, methods: Sequence[str | tuple[str, dict]],
        keep: int | None = None, ratio: float | None = None, max_new_tokens: int = 16,
        stages: str = "final") -> list[Entry]:
    """The unpruned model's answer and, per method (a name, a spec such as ``fastv:layer=2`` or a (name, options)
    pair), its answer and kept tokens on ``image``. ``stages="all"``: one entry per stage of multi-stage methods."""
    import vtprune
    from vtprune import spec

    inputs = encode(processor, image, question)
    budget = {"keep": keep} if keep is not None else {"ratio": ratio if ratio is not None else 0.889}
    # the unpruned row: keep every token (its masks are the prompt's; ratio 0 is bit-identical to no pruning)
    with vtprune.prune(model, "random", ratio=0.0) as h:
        entries = [Entry("unpruned", tokens=None, answer=answer(model, processor, inputs, max_new_tokens), stage=0)]
        entries[0].tokens = h.kept_masks()[0]
    for m in methods:
        name, options = spec.parse(m) if isinstance(m, str) else m
        with vtprune.prune(model, vtprune.method(name, **options), **budget) as h:
            said = answer(model, processor, inputs, max_new_tokens)
            tokens = h.kept_masks()[0]
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        if stages == "all" and len(tokens.stages) > 2:
            entries += [Entry(f"{label} [{tokens.stages[s]}]", tokens, said, stage=s)
                        for s in range(1, len(tokens.stages))]
        else:
            entries.append(Entry(label, tokens, said))
    return entries


DEFAULT_METHODS = ("random", "kcenter", "cls_attention", "fastv", "vscan", "pdrop:budget_mode=last")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtprune show", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="an image file (default: a held-out synthetic scene and its question)")
    p.add_argument("--question", help="the question (default with an image: 'Describe the image.')")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="names or specs such as fastv:layer=2 (default: %(default)s)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--keep", type=int, help="visual tokens kept per image (default 64)")
    amount.add_argument("--ratio", type=float, help="fraction of visual tokens removed")
    p.add_argument("--model", default=None, help="a local checkpoint directory with its processor "
                                                  "(default: the embedded models/synthetic-llava)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--sample", type=int, default=0, help="without an image: which held-out synthetic question")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--stage", choices=["final", "all"], default="final",
                   help="final: the tokens reaching the last layer; all: one row per stage of multi-stage methods")
    p.add_argument("--height", type=int, default=224, help="pixels per panel")
    p.add_argument("--out", default="out/show.png")
    return p


def main(argv: list[str] | None = None) -> int:
    import vtprune
    from vtprune.bench.accuracy import DEFAULT_MODEL

    args = build_parser().parse_args(argv)
    for m in args.methods:  # every spec valid before a checkpoint loads
        from vtprune import spec

        name, options = spec.parse(m)
        vtprune.method(name, **options)
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
        question = args.question or "Describe the image."
        target = None
    else:
        from vtprune.synthetic.scenes import heldout

        sample = heldout(1, offset=args.sample)[0]
        image, question, target = sample.image, args.question or sample.question, sample.answer
    model, processor = _load(str(args.model or DEFAULT_MODEL), args.dtype)
    keep = args.keep if args.keep is not None or args.ratio is not None else 64
    entries = run(model, processor, image, question, args.methods, keep=keep, ratio=args.ratio,
                  max_new_tokens=args.max_new_tokens, stages=args.stage)
    adapter = vtprune.adapter_for(model)
    title = f"{Path(str(args.model or DEFAULT_MODEL)).name} · {question!r}" + (f" (truth: {target!r})"
                                                                              if target else "")
    path = figure([image], entries, adapter, args.out, processor=processor, title=title, height=args.height)
    for e in entries:
        print(f"  {e.caption()}")
    print(f"wrote {path}")
    return 0
