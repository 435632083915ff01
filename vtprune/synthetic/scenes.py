"""Seeded procedural VQA scenes: a few small shapes on a noisy grey background, one-word answers.

A 336 x 336 image is a 24 x 24 grid of 14 px patches (LLaVA-1.5 geometry: 576 visual tokens) and a 3 x 3 layout
of 112 px regions (8 x 8 patches each). A scene holds 0-5 objects, at most one per region, each 32-46 px across
(about 3 x 3 patches), so objects cover roughly 2-8 % of the patches: the answer lives in a few tokens and the
rest is background, which is what makes visual-token pruning matter.

Every question type draws its ANSWER first and then builds a scene that has it, so answers are balanced and a
model cannot score by answer priors (chance is 1/2 for existence, 1/3 for shape, 1/5 for counts, 1/6 for colour,
1/9 for position).

Samples are a pure function of ``(split, index)``: seeds come from ``numpy.random.SeedSequence((split_id, index))``
and the two splits use different ``split_id`` values, so training and held-out streams never share a seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 patches per side -> 576 visual tokens
REGION_PATCHES = GRID // 3  # 8 patches per region side
REGION_PX = IMAGE_SIZE // 3  # 112 px

# Saturated, well separated colours (RGB); a little per-object jitter is added at render time.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 210),
    "white": (240, 240, 240),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
REGIONS: tuple[str, ...] = (
    "top-left", "top-middle", "top-right",
    "middle-left", "center", "middle-right",
    "bottom-left", "bottom-middle", "bottom-right",
)
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "position", "count", "exists")
MAX_OBJECTS = 5
MAX_COUNT = 4  # count answers are 0..MAX_COUNT
COUNT_WORDS: tuple[str, ...] = tuple(str(i) for i in range(MAX_COUNT + 1))
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}

# Object diameter range (px) and the margin kept from the region border, so objects never cross regions.
_SIZE_RANGE = (32, 46)
_MARGIN = 4


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: attributes, its 3 x 3 region index and its bounding box (x0, y0, x1, y1) in px."""

    colour: str
    shape: str
    region: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class Sample:
    """One VQA sample.

    ``patch_object[r, c]`` is the index into ``objects`` of the object covering most of patch (r, c), or -1 for
    background; ``patch_coverage[r, c]`` is the fraction of that patch's pixels it covers. ``patch_colour`` /
    ``patch_shape`` are 1-based indices into ``COLOUR_NAMES`` / ``SHAPES`` (0 = background).
    """

    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: tuple[SceneObject, ...]
    patch_object: np.ndarray
    patch_coverage: np.ndarray
    split: str
    index: int
    patch_colour: np.ndarray = field(init=False)
    patch_shape: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        colour = np.zeros((GRID, GRID), np.int64)
        shape = np.zeros((GRID, GRID), np.int64)
        for i, obj in enumerate(self.objects):
            hit = self.patch_object == i
            colour[hit] = COLOUR_NAMES.index(obj.colour) + 1
            shape[hit] = SHAPES.index(obj.shape) + 1
        object.__setattr__(self, "patch_colour", colour)
        object.__setattr__(self, "patch_shape", shape)


def vocabulary() -> list[str]:
    """Every word a question or answer can contain (the tokenizer's non-special vocabulary), sorted."""
    words = {"what", "colour", "is", "the", "shape", "in", "where", "how", "many", "shapes", "are", "there",
             "a", "?", "yes", "no", "USER:", "ASSISTANT:"}
    words.update(COLOUR_NAMES, SHAPES, (s + "s" for s in SHAPES), REGIONS, COUNT_WORDS)
    return sorted(words)


def answers() -> list[str]:
    """Every possible answer word."""
    return sorted({*COLOUR_NAMES, *SHAPES, *REGIONS, *COUNT_WORDS, "yes", "no"})


def region_of_patch(row: int, col: int) -> int:
    """3 x 3 region index of patch (row, col)."""
    return (row // REGION_PATCHES) * 3 + col // REGION_PATCHES


# --------------------------------------------------------------------------------------------------- scenes

Attrs = tuple[str, str]  # (colour, shape)


def _random_attrs(rng: np.random.Generator, exclude: set[Attrs] | None = None) -> Attrs:
    while True:
        attrs = (COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))], SHAPES[rng.integers(len(SHAPES))])
        if not exclude or attrs not in exclude:
            return attrs


def _place(rng: np.random.Generator, attrs: list[Attrs], regions: list[int] | None = None) -> list[SceneObject]:
    """Put objects with ``attrs`` into distinct regions (``regions[i]`` fixed where given, else random)."""
    regions = list(regions or [])
    free = [r for r in rng.permutation(9).tolist() if r not in regions]
    regions += free[: len(attrs) - len(regions)]
    objs = []
    for (colour, shape), region in zip(attrs, regions):
        size = int(rng.integers(_SIZE_RANGE[0], _SIZE_RANGE[1] + 1))
        rx, ry = (region % 3) * REGION_PX, (region // 3) * REGION_PX
        x0 = rx + int(rng.integers(_MARGIN, REGION_PX - _MARGIN - size + 1))
        y0 = ry + int(rng.integers(_MARGIN, REGION_PX - _MARGIN - size + 1))
        objs.append(SceneObject(colour, shape, region, (x0, y0, x0 + size, y0 + size)))
    return objs


def _question(rng: np.random.Generator, qtype: str) -> tuple[str, str, list[SceneObject]]:
    """Draw the answer, then a scene with that answer and distractors; return (question, answer, objects)."""
    n_extra = lambda k: int(rng.integers(0, MAX_OBJECTS - k + 1))  # noqa: E731 - distractors beside k targets

    if qtype in ("colour", "shape", "position"):
        target = _random_attrs(rng)
        region = int(rng.integers(9))
        # Near misses (same colour or same shape elsewhere) make the model bind attributes to positions.
        others = [_random_attrs(rng, exclude={target}) for _ in range(n_extra(1))]
        objs = _place(rng, [target, *others], [region])
        if qtype == "colour":
            return f"what colour is the shape in the {REGIONS[region]} ?", target[0], objs
        if qtype == "shape":
            return f"what shape is in the {REGIONS[region]} ?", target[1], objs
        return f"where is the {target[0]} {target[1]} ?", REGIONS[region], objs

    if qtype == "count":
        k = int(rng.integers(0, MAX_COUNT + 1))
        kind = ("colour", "shape", "all")[rng.integers(3)]
        colour, shape = _random_attrs(rng)
        if kind == "all":
            return "how many shapes are there ?", str(k), _place(rng, [_random_attrs(rng) for _ in range(k)])
        match = (lambda a: a[0] == colour) if kind == "colour" else (lambda a: a[1] == shape)
        hits = [_random_attrs(rng) for _ in range(k)]
        hits = [(colour, a[1]) if kind == "colour" else (a[0], shape) for a in hits]
        misses = []
        for _ in range(n_extra(k)):
            while match(a := _random_attrs(rng)):
                pass
            misses.append(a)
        attrs = [*hits, *misses]
        attrs = [attrs[i] for i in rng.permutation(len(attrs))]
        q = f"how many {colour} shapes are there ?" if kind == "colour" else f"how many {shape}s are there ?"
        return q, str(k), _place(rng, attrs)

    if qtype == "exists":
        target = _random_attrs(rng)
        present = bool(rng.integers(2))
        others = []
        for _ in range(n_extra(1 if present else 0)):
            # Half the distractors share one attribute with the target, so a yes needs the conjunction.
            if rng.random() < 0.5:
                c, s = _random_attrs(rng, exclude={target})
                a = (target[0], s) if rng.random() < 0.5 else (c, target[1])
                others.append(a if a != target else (c, s))
            else:
                others.append(_random_attrs(rng, exclude={target}))
        attrs = [target, *others] if present else others
        attrs = [attrs[i] for i in rng.permutation(len(attrs))]
        return f"is there a {target[0]} {target[1]} ?", "yes" if present else "no", _place(rng, attrs)

    raise ValueError(f"unknown question type {qtype!r}; known: {QUESTION_TYPES}")


# --------------------------------------------------------------------------------------------------- render

def _mask(obj: SceneObject) -> Image.Image:
    """The object's silhouette as a binary ``L`` image (no anti-aliasing, so coverage is exact)."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif obj.shape == "square":
        inset = (x1 - x0) // 10  # a square of the same diameter looks much bigger than a circle; shrink it a bit
        draw.rectangle((x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset), fill=255)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return mask


def render(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Draw ``objects`` on a noisy grey background; return (image, patch_object, patch_coverage)."""
    # Uniform integer noise (std ~5): 6x cheaper than Gaussian and just as good at breaking exact repeats.
    base = int(rng.integers(25, 90))
    pixels = base + rng.integers(-8, 9, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
    coverage = np.zeros((len(objects), GRID, GRID))
    for i, obj in enumerate(objects):
        mask = np.asarray(_mask(obj)) > 0
        colour = np.array(COLOURS[obj.colour]) + rng.integers(-15, 16, 3)
        pixels[mask] += (colour - base).astype(np.int16)  # the object's colour plus the same noise
        coverage[i] = mask.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if not objects:
        return image, np.full((GRID, GRID), -1, np.int64), np.zeros((GRID, GRID))
    best = coverage.argmax(0)
    cover = coverage.max(0)
    return image, np.where(cover > 0, best, -1), cover


# --------------------------------------------------------------------------------------------------- samples

def make_sample(index: int, split: str = "train", qtype: str | None = None) -> Sample:
    """Sample ``index`` of ``split`` ("train" or "heldout"); deterministic in its arguments.

    The question type cycles through ``QUESTION_TYPES`` with ``index`` (balanced batches) unless ``qtype`` is given.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {tuple(SPLITS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence((SPLITS[split], index)))
    qtype = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    question, answer, objs = _question(rng, qtype)
    image, patch_object, coverage = render(tuple(objs), rng)
    return Sample(image, question, answer, qtype, tuple(objs), patch_object, coverage, split, index)


def follow_up_questions(sample: Sample, n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` more distinct (question, answer, qtype) triples about ``sample``'s scene, answers read off its objects.

    Training only: extra supervised answers per image cost a few text tokens next to 576 visual ones. Unlike the
    sample's own question their answers are not balanced (e.g. most "is there" answers are "no"), so evaluation
    never uses them. The sample's own question is never repeated (a repeat could be answered by copying).
    """
    rng = np.random.default_rng(np.random.SeedSequence((2, sample.index, seed)))
    objs = sample.objects
    seen = {sample.question}
    out: list[tuple[str, str, str]] = []
    for _ in range(50 * n):  # every scene has far more than n distinct count / existence questions
        if len(out) >= n:
            break
        qtype = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
        qa: tuple[str, str] | None = None
        if qtype in ("colour", "shape") and objs:
            obj = objs[rng.integers(len(objs))]
            where = REGIONS[obj.region]
            qa = ((f"what colour is the shape in the {where} ?", obj.colour) if qtype == "colour"
                  else (f"what shape is in the {where} ?", obj.shape))
        elif qtype == "position" and objs:
            pairs = [(o.colour, o.shape) for o in objs]
            unique = [o for o, p in zip(objs, pairs) if pairs.count(p) == 1]
            if unique:
                obj = unique[rng.integers(len(unique))]
                qa = (f"where is the {obj.colour} {obj.shape} ?", REGIONS[obj.region])
        elif qtype == "count":
            kind = ("colour", "shape", "all")[rng.integers(3)]
            colour, shape = _random_attrs(rng)
            if kind == "all" and len(objs) <= MAX_COUNT:
                qa = ("how many shapes are there ?", str(len(objs)))
            elif kind == "colour":
                qa = (f"how many {colour} shapes are there ?", str(sum(o.colour == colour for o in objs)))
            elif kind == "shape":
                qa = (f"how many {shape}s are there ?", str(sum(o.shape == shape for o in objs)))
        elif qtype == "exists":
            # Half the time ask about an object that is there, so "yes" is not rare.
            if objs and rng.random() < 0.5:
                colour, shape = (obj := objs[rng.integers(len(objs))]).colour, obj.shape
            else:
                colour, shape = _random_attrs(rng)
            present = any((o.colour, o.shape) == (colour, shape) for o in objs)
            qa = (f"is there a {colour} {shape} ?", "yes" if present else "no")
        if qa is not None and qa[0] not in seen:
            seen.add(qa[0])
            out.append((*qa, qtype))
    return out


def iter_samples(split: str = "train", start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """Samples ``start, start + 1, ...`` of ``split`` (endless when ``stop`` is None)."""
    i = start
    while stop is None or i < stop:
        yield make_sample(i, split)
        i += 1


def heldout(n: int = 1000, offset: int = 0) -> list[Sample]:
    """The fixed held-out set: ``n`` samples from index ``offset`` of the held-out split (types balanced)."""
    return list(iter_samples("heldout", offset, offset + n))


def relevant_objects(question: str, objects: tuple[SceneObject, ...] | list[SceneObject]) -> list[int]:
    """Indices into ``objects`` of the objects ``question`` is about (empty when it asks about an absent object).

    Training only (attention supervision): colour / shape at a region -> the object in that region; "where is the
    c s" and "is there a c s" -> the objects with that colour and shape; "how many ..." -> every object counted.
    """
    words = question.split()
    if question.startswith("what colour is the shape in the ") or question.startswith("what shape is in the "):
        region = REGIONS.index(words[-2])
        return [i for i, o in enumerate(objects) if o.region == region]
    if question.startswith("where is the ") or question.startswith("is there a "):
        colour, shape = words[-3], words[-2]
        return [i for i, o in enumerate(objects) if (o.colour, o.shape) == (colour, shape)]
    if question == "how many shapes are there ?":
        return list(range(len(objects)))
    if question.startswith("how many ") and words[3] == "shapes":  # how many <colour> shapes are there ?
        return [i for i, o in enumerate(objects) if o.colour == words[2]]
    if question.startswith("how many "):  # how many <shape>s are there ?
        return [i for i, o in enumerate(objects) if o.shape + "s" == words[2]]
    raise ValueError(f"unknown question {question!r}")
