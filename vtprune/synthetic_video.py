"""Offline, seeded synthetic video QA: coloured shapes moving over a dark background.

Each item is a small mp4 (PyAV: H.264, or MPEG-4 Part 2 when libx264 is missing) and one multiple-choice
question whose answer needs the video, most of them its motion or its timeline:

* ``direction_colour`` — "Which colour moves left?" (one object moves that way, the others elsewhere);
* ``direction_of`` — "Which direction does the red circle move?";
* ``count`` — "How many objects appear in the video?" (objects enter at different times, so a few
  frames can miss one);
* ``first`` — "Which colour appears first?" (order of appearance);
* ``shape_of`` — "What shape is the blue object?" (a spatial control question).

``generate(out_dir, n, seed)`` writes ``videos/*.mp4`` plus ``annotations.json`` and ``annotations.csv``
(video, question, options, answer), the format ``scripts/video_qa.py`` reads. Everything is drawn from
``numpy.random.default_rng([seed, index])``: the same seed gives the same questions and pixels (the mp4
bytes, from a single-threaded encoder, were equal in every run but one under heavy load).
``python -m vtprune.synthetic_video --out DIR``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 100, 235), "yellow": (235, 215, 40),
    "purple": (160, 70, 210), "orange": (245, 140, 30), "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
KINDS: tuple[str, ...] = ("direction_colour", "direction_of", "count", "first", "shape_of")
BACKGROUND = (28, 28, 32)


@dataclass(frozen=True)
class Track:
    """One object: where it is at its first visible frame, how it moves (pixels per frame), when it shows."""

    colour: str
    shape: str
    radius: int  # half the side of its bounding box, pixels
    x: float  # centre at frame ``start``
    y: float
    vx: float
    vy: float
    start: int = 0  # first frame it is visible (it stays to the end)

    def centre(self, f: int) -> tuple[float, float]:
        return self.x + self.vx * (f - self.start), self.y + self.vy * (f - self.start)


@dataclass(frozen=True)
class Item:
    """One video question. ``answer`` is one of ``options`` (its letter is ``"ABCD"[options.index(answer)]``)."""

    id: str
    video: str  # path relative to the annotation file
    question: str
    options: list[str]
    answer: str
    kind: str
    frames: int
    fps: float


def render(tracks: Sequence[Track], frames: int, width: int, height: int) -> np.ndarray:
    """Draw the tracks: (frames, height, width, 3) uint8 RGB; later tracks are drawn on top."""
    out = np.empty((frames, height, width, 3), np.uint8)
    out[:] = BACKGROUND
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
    for f in range(frames):
        for t in tracks:
            if f < t.start:
                continue
            cx, cy = t.centre(f)
            dx, dy, r = xx - cx, yy - cy, t.radius
            if t.shape == "circle":
                mask = dx * dx + dy * dy <= r * r
            elif t.shape == "square":
                mask = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
            else:  # upward isosceles triangle inside the box: below the apex, within both slanted edges
                mask = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
            out[f][mask] = COLOURS[t.colour]
    return out


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, codec: str = "auto", *,
                quality: int = 18) -> str:
    """Encode (F, H, W, 3) uint8 RGB frames (even H and W) to ``path`` with PyAV; returns the codec used.

    ``codec="auto"`` picks libx264 (H.264, ``crf=quality``) when the bundled FFmpeg has it, else mpeg4
    (4 Mbit/s). One encoder thread keeps the bytes reproducible and the CPU use modest.
    """
    import av
    from fractions import Fraction

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")
    if codec == "auto":
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": str(quality), "preset": "medium"}
        elif codec == "mpeg4":
            stream.bit_rate = 4_000_000  # generous for these small frames: near-lossless flat colours
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return codec


def _options(rng: np.random.Generator, answer: str, pool: Sequence[str], k: int = 4,
             preferred: Sequence[str] = ()) -> list[str]:
    """``answer`` plus up to k-1 distinct distractors, ``preferred`` ones first (e.g. the other colours on
    screen, so the question cannot be answered by spotting the only colour present), then from ``pool``."""
    first = [p for p in dict.fromkeys(preferred) if p != answer][: k - 1]
    rest = [p for p in dict.fromkeys(pool) if p != answer and p not in first]
    n = min(k - 1 - len(first), len(rest))
    picked = [rest[i] for i in rng.choice(len(rest), size=n, replace=False)] if n > 0 else []
    opts = [answer, *first, *picked]
    rng.shuffle(opts)
    return opts


def _track(rng: np.random.Generator, colour: str, shape: str, direction: str | None, frames: int, width: int,
           height: int, start: int = 0, radius: int | None = None) -> Track:
    """A track that stays inside the frame from ``start`` to the end, travelling about 45% of the frame."""
    r = radius or int(min(width, height) * rng.uniform(0.08, 0.11))
    span = max(frames - 1 - start, 1)
    dx, dy = DIRECTIONS[direction] if direction else (0, 0)
    vx, vy = dx * 0.45 * width / span, dy * 0.45 * height / span
    # the centre must stay in [r, side - r] at both ends of the motion
    lo_x, hi_x = r + max(0.0, -vx * span), width - r - max(0.0, vx * span)
    lo_y, hi_y = r + max(0.0, -vy * span), height - r - max(0.0, vy * span)
    return Track(colour, shape, r, float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)), vx, vy, start)


def make_item(index: int, seed: int = 0, *, kind: str | None = None, frames: int = 32, fps: float = 8.0,
              width: int = 160, height: int = 120) -> tuple[Item, list[Track]]:
    """The ``index``-th question of the set drawn with ``seed`` (kinds rotate with the index)."""
    rng = np.random.default_rng([seed, index])
    kind = kind or KINDS[index % len(KINDS)]
    colours = list(COLOURS)
    dirs = list(DIRECTIONS)
    n_obj = int(rng.integers(2, 4))
    cols = [str(c) for c in rng.choice(colours, size=n_obj, replace=False)]
    shapes = [str(rng.choice(SHAPES)) for _ in range(n_obj)]
    late = frames // 2  # latest start, so late objects are still on screen for half the video

    def tracks(directions: Sequence[str | None], starts: Sequence[int] | None = None) -> list[Track]:
        starts = starts or [0] * n_obj
        return [_track(rng, c, s, d, frames, width, height, st)
                for c, s, d, st in zip(cols, shapes, directions, starts)]

    if kind == "direction_colour":
        ds = [str(d) for d in rng.choice(dirs, size=n_obj, replace=False)]
        target = ds[0]
        question, answer = f"Which colour moves {target}?", cols[0]
        tr = tracks(ds)
        options = _options(rng, answer, colours, preferred=cols)
    elif kind == "direction_of":
        ds = [str(d) for d in rng.choice(dirs, size=n_obj, replace=True)]
        question = f"Which direction does the {cols[0]} {shapes[0]} move?"
        answer, tr = ds[0], tracks(ds)
        options = _options(rng, answer, dirs)
    elif kind == "count":
        n_obj = int(rng.integers(1, 6))
        cols = [str(c) for c in rng.choice(colours, size=n_obj, replace=False)]
        shapes = [str(rng.choice(SHAPES)) for _ in range(n_obj)]
        starts = [0] + sorted(int(s) for s in rng.integers(0, late + 1, size=n_obj - 1))
        tr = tracks([str(rng.choice(dirs)) for _ in range(n_obj)], starts)
        question, answer = "How many objects appear in the video?", str(n_obj)
        options = _options(rng, answer, [str(i) for i in range(1, 7)])
    elif kind == "first":
        starts = sorted(rng.choice(np.arange(0, late + 1, 2), size=n_obj, replace=False).tolist())
        order = list(rng.permutation(n_obj))  # which object gets which start
        tr = tracks([str(rng.choice(dirs)) for _ in range(n_obj)], [int(starts[order.index(i)]) for i in range(n_obj)])
        first = min(range(n_obj), key=lambda i: tr[i].start)
        question, answer = "Which colour appears first?", cols[first]
        options = _options(rng, answer, colours, preferred=cols)
    elif kind == "shape_of":
        shapes = [str(s) for s in rng.choice(SHAPES, size=n_obj, replace=n_obj > len(SHAPES))]
        tr = tracks([str(rng.choice(dirs)) for _ in range(n_obj)])
        question, answer = f"What shape is the {cols[0]} object?", shapes[0]
        options = _options(rng, answer, list(SHAPES))
    else:
        raise ValueError(f"unknown question kind {kind!r}; kinds: {', '.join(KINDS)}")
    item = Item(id=f"{seed}-{index:05d}", video=f"videos/{seed}-{index:05d}.mp4", question=question,
                options=options, answer=answer, kind=kind, frames=frames, fps=fps)
    return item, tr


def generate(out_dir: str | os.PathLike, n: int = 20, seed: int = 0, *, frames: int = 32, fps: float = 8.0,
             width: int = 160, height: int = 120, kinds: Sequence[str] | None = None,
             codec: str = "auto") -> list[Item]:
    """Write ``n`` items to ``out_dir`` (videos/, annotations.json, annotations.csv); returns them.

    ``kinds`` restricts the question kinds (rotated through by index). Existing files are overwritten.
    """
    kinds = tuple(kinds or KINDS)
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise ValueError(f"unknown question kind(s) {bad}; kinds: {', '.join(KINDS)}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        item, tracks = make_item(i, seed, kind=kinds[i % len(kinds)], frames=frames, fps=fps, width=width,
                                 height=height)
        write_video(out / item.video, render(tracks, frames, width, height), fps, codec)
        items.append(item)
    meta = {"generator": "vtprune.synthetic_video", "seed": seed, "frames": frames, "fps": fps,
            "width": width, "height": height, "items": [asdict(it) for it in items]}
    (out / "annotations.json").write_text(json.dumps(meta, indent=1) + "\n")
    with open(out / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "video", "question", "options", "answer", "kind"])
        for it in items:
            w.writerow([it.id, it.video, it.question, "|".join(it.options), it.answer, it.kind])
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtprune.synthetic_video", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (videos/, annotations.json, annotations.csv)")
    p.add_argument("-n", "--n", type=int, default=20, help="number of questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--size", default="160x120", help="WIDTHxHEIGHT, both even")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated question kinds")
    p.add_argument("--codec", default="auto", help="libx264 | mpeg4 | auto")
    a = p.parse_args(argv)
    width, height = (int(v) for v in a.size.lower().split("x"))
    items = generate(a.out, a.n, a.seed, frames=a.frames, fps=a.fps, width=width, height=height,
                     kinds=[k for k in a.kinds.split(",") if k], codec=a.codec)
    print(f"wrote {len(items)} videos and {Path(a.out) / 'annotations.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
