"""lmms-eval hooks of the offline synthetic VQA task, and the script that writes its data.

The data (PNG images + ``data/heldout.jsonl``) is generated locally from ``vtprune.synthetic.scenes``'s
held-out split, next to this file: ``python eval/tasks/synthetic_vqa/utils.py --n 1000``. Images are
addressed relative to this file, so the task directory can be copied anywhere (``write_task``).
Scoring matches ``vtprune.synthetic.eval.evaluate``: the first generated word against the one-word answer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
JSONL = "heldout.jsonl"
TASK = "synthetic_vqa"


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The scene image of ``doc`` (path relative to ``data/``)."""
    with Image.open(DATA_DIR / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The bare question: the model's chat template adds the image and the roles."""
    return doc["question"]


def first_word(text: str) -> str:
    """The first whitespace-separated word of a generation ("" if it is empty)."""
    words = text.split()
    return words[0] if words else ""


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """Exact match of the first generated word."""
    response = results[0] if results else ""
    return {"exact_match": float(first_word(str(response)) == doc["answer"])}


def write_data(n: int = 1000, offset: int = 0, data_dir: Path = DATA_DIR) -> Path:
    """Write held-out samples ``offset .. offset + n - 1`` (PNG + one JSONL row each); returns the JSONL path.

    Images already on disk are reused (samples are a pure function of their index)."""
    from vtprune.synthetic.scenes import make_sample  # only the writer needs the generator

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    images = data_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(offset, offset + n):
        s = make_sample(index, "heldout")
        name = f"images/heldout_{index:06d}.png"
        if not (data_dir / name).exists():  # write + rename: data-parallel ranks may write at once
            tmp = data_dir / f"{name}.{os.getpid()}.tmp"
            s.image.save(tmp, format="PNG")
            tmp.replace(data_dir / name)
        rows.append({"id": index - offset, "index": index, "split": "heldout", "question": s.question,
                     "answer": s.answer, "qtype": s.qtype, "image": name})
    path = data_dir / JSONL
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return path


def write_task(dest: Path, n: int = 1000, offset: int = 0) -> Path:
    """A self-contained copy of this task under ``dest/synthetic_vqa`` (YAML + this file + data) with
    ``n`` samples; returns ``dest`` (pass it to lmms-eval as an include path)."""
    task_dir = Path(dest) / TASK
    task_dir.mkdir(parents=True, exist_ok=True)
    for name in (f"{TASK}.yaml", "utils.py"):
        if (HERE / name).resolve() != (task_dir / name).resolve():
            shutil.copyfile(HERE / name, task_dir / name)
    write_data(n, offset, task_dir / "data")
    return Path(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the synthetic VQA task's data (offline).")
    parser.add_argument("--n", type=int, default=1000, help="held-out samples to write")
    parser.add_argument("--offset", type=int, default=0, help="first held-out index")
    parser.add_argument("--dest", type=Path, default=None,
                        help="write a self-contained task copy under DEST/synthetic_vqa (default: ./data)")
    args = parser.parse_args(argv)
    if args.dest is None:
        print(write_data(args.n, args.offset))
    else:
        print(write_task(args.dest, args.n, args.offset) / TASK)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
