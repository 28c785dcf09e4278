"""Where images come from before they become shards: a class-per-folder tree, a manifest, or the
embedded synthetic set. Each source lists `Item`s cheaply; the bytes are read later, in parallel.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from data.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class Payload:
    data: bytes
    ext: str  # "jpg", "png", ... as it will be named in the shard
    meta: dict = field(default_factory=dict)  # learned while reading (e.g. what was drawn)


@dataclass(frozen=True)
class Item:
    label: str
    read: Callable[[], Payload]  # picklable (a partial of a module function): runs in a worker
    source: str  # path or name, for messages and KEY.json
    split: str | None = None  # None: the writer assigns train/val
    meta: dict = field(default_factory=dict)  # extra manifest columns, carried into KEY.json


def read_file(path: str) -> Payload:
    with open(path, "rb") as f:
        data = f.read()
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return Payload(data, "jpg" if ext == "jpeg" else ext)


def from_folder(root: str) -> list[Item]:
    """One subfolder per class; files sorted so the same tree always lists the same way."""
    if not os.path.isdir(root):
        raise UserError(f"--from-folder {root}: not a directory (expected one subfolder per class)")
    items = []
    for label in sorted(os.listdir(root)):
        class_dir = os.path.join(root, label)
        if label.startswith(".") or not os.path.isdir(class_dir):
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                items.append(Item(label, partial(read_file, path), rel, meta={"source": rel}))
    return items


def from_manifest(path: str) -> list[Item]:
    """CSV or JSON Lines with `path` and `label`, optional `split`; other columns go to KEY.json.

    Relative paths resolve against the manifest's own directory.
    """
    if not os.path.isfile(path):
        raise UserError(f"--from-manifest {path}: no such file")
    with open(path, encoding="utf-8-sig") as f:  # -sig: spreadsheet CSVs start with a BOM
        text = f.read()
    if path.endswith((".jsonl", ".ndjson")):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        raise UserError(f"--from-manifest {path}: expected a .csv or .jsonl file")
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for line, row in enumerate(rows, start=2 if path.endswith(".csv") else 1):
        missing = [c for c in ("path", "label") if not str(row.get(c) or "").strip()]
        if missing:
            raise UserError(
                f"{path}:{line}: missing {', '.join(missing)} (columns found: {sorted(row)}; "
                "a manifest needs path,label and may have split plus any other columns)"
            )
        file = os.path.join(base, row["path"])
        split = str(row.get("split") or "").strip() or None
        meta = {k: v for k, v in row.items() if k not in ("label", "split")}
        items.append(Item(str(row["label"]).strip(), partial(read_file, file), row["path"], split, meta))
    return items


def render_synthetic(seed: int, index: int, size: int) -> Payload:
    from PIL import Image

    from data import synthetic

    pixels, _, drawn = synthetic.render(seed, index, size)
    buf = io.BytesIO()
    # Fixed quality and no optimisation passes: identical bytes on every run.
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    return Payload(buf.getvalue(), "jpg", drawn)


def from_synthetic(num_samples: int, seed: int, size: int) -> list[Item]:
    from data import synthetic

    return [
        Item(
            synthetic.CLASSES[synthetic.label_of(seed, i)],
            partial(render_synthetic, seed, i, size),
            f"synthetic:{seed}/{i}",
            meta={"source": f"synthetic:{seed}/{i}"},
        )
        for i in range(num_samples)
    ]
