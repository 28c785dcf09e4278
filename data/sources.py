"""Where images come from before they become shards: a class-per-folder tree, the MVTec AD
layout, a manifest, or the embedded synthetic set. Each source lists `Item`s cheaply; the bytes
are read later, in parallel.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from data.errors import UserError
from data.targets import encode_mask, find_good, good_first, split_labels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class Payload:
    data: bytes
    ext: str  # "jpg", "png", ... as it will be named in the shard
    meta: dict = field(default_factory=dict)  # learned while reading (e.g. what was drawn)
    mask: bytes | None = None  # KEY.mask.png: single-channel PNG of class indices (0: good)
    size: tuple[int, int] | None = None  # (width, height), once the writer's check has read it


@dataclass(frozen=True)
class Item:
    label: str
    read: Callable[[], Payload]  # picklable (a partial of a module function): runs in a worker
    source: str  # path or name, for messages and KEY.json
    split: str | None = None  # None: the writer assigns val (by --val-fraction) or `rest`
    meta: dict = field(default_factory=dict)  # extra manifest columns, carried into KEY.json
    mask: str | None = None  # the mask's path or name: the data set then has masks
    rest: str = "train"  # an unsplit item not drawn for val goes here (MVTec's test images: test)


def _read(path: str) -> bytes:
    """A local path, or an fsspec URL (s3://, gs://, https://: sources on object storage)."""
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_file(path: str, mask: str | None = None) -> Payload:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return Payload(_read(path), "jpg" if ext == "jpeg" else ext, mask=_read(mask) if mask else None)


def _resolve(base: str, path: str) -> str:
    """A manifest's path: absolute or a URL as it is, else relative to the manifest's place."""
    if "://" in path or os.path.isabs(path):
        return path
    return f"{base.rstrip('/')}/{path}" if "://" in base else os.path.join(base, path)


def _exists(path: str) -> bool:
    if "://" in path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        return fs.exists(root)
    return os.path.isfile(path)


def _missing_masks(items: list[Item], where: str) -> None:
    """Every missing mask file named before anything is written."""
    missing = [i.mask for i in items if i.mask and not _exists(i.mask)]
    if missing:
        shown = "\n  ".join(missing[:20]) + (
            f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        )
        raise UserError(f"{where}: {len(missing)} mask file(s) missing, nothing written:\n  {shown}")


def from_folder(root: str) -> list[Item]:
    """One subfolder per class, or the MVTec AD layout; files sorted so the same tree always
    lists the same way."""
    if not os.path.isdir(root):
        raise UserError(f"--from-folder {root}: not a directory (expected one subfolder per class)")
    if is_mvtec(root):
        return from_mvtec(root)
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


def _files(folder: str) -> list[str]:
    return sorted(
        n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))
    )


def is_mvtec(root: str) -> bool:
    return all(os.path.isdir(os.path.join(root, *d)) for d in (("train", "good"), ("test",)))


def from_mvtec(root: str) -> list[Item]:
    """The MVTec AD layout as it is: train/good/ (good parts only), test/<class>/ with masks at
    ground_truth/<class>/<name>_mask.png for every class but good. Train keeps its split; test
    images give val (--val-fraction, stratified) and the rest stay test."""
    items = []
    for name in _files(os.path.join(root, "train", "good")):
        rel = f"train/good/{name}"
        items.append(Item("good", partial(read_file, os.path.join(root, rel)), rel, "train", {"source": rel}))
    test = os.path.join(root, "test")
    for label in sorted(
        d for d in os.listdir(test) if os.path.isdir(os.path.join(test, d)) and not d.startswith(".")
    ):
        for name in _files(os.path.join(test, label)):
            rel = f"test/{label}/{name}"
            mask = None
            if label != "good":
                mask = os.path.join(root, "ground_truth", label, f"{os.path.splitext(name)[0]}_mask.png")
            read = partial(read_file, os.path.join(root, rel), mask)
            items.append(Item(label, read, rel, None, {"source": rel}, mask=mask, rest="test"))
    _missing_masks(items, f"--from-folder {root} (MVTec AD layout)")
    return items


def from_manifest(path: str) -> list[Item]:
    """CSV or JSON Lines rows, read by `items_from_rows`; relative paths resolve against the
    manifest's own directory."""
    if not _exists(path):
        raise UserError(f"--from-manifest {path}: no such file")
    text = _read(path).decode("utf-8-sig")  # -sig: spreadsheet CSVs start with a BOM
    if path.endswith((".jsonl", ".ndjson")):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        raise UserError(f"--from-manifest {path}: expected a .csv or .jsonl file")
    first = 2 if path.endswith(".csv") else 1  # a CSV's line 1 is its header
    located = ((f"{path}:{line}", row) for line, row in enumerate(rows, start=first))
    base = path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(os.path.abspath(path))
    return items_from_rows(located, base, f"--from-manifest {path}")


def _text(value) -> str:
    return "" if value is None else str(value).strip()  # a label 0 from JSON or SQL is a label


def items_from_rows(rows: Iterable[tuple[str, dict]], base: str, where: str) -> list[Item]:
    """The rows of a manifest or a SQL query, each with where it came from (`labels.csv:3`) for
    messages, as items: `path` and `label` (or `labels`), optional `split` and `mask`; other
    columns go to KEY.json.

    `labels` names a part's defects, ";"-separated (empty: a good part); `mask` is the path of a
    single-channel PNG of class indices (0: good), or a binary mask of the row's `label`. Relative
    paths resolve against `base`; `where` names the source in the missing-masks message.
    """
    items = []
    for location, row in rows:
        has_labels = "labels" in row and row["labels"] is not None
        missing = [c for c in ("path", "label") if not _text(row.get(c))]
        if has_labels and missing == ["label"]:
            missing = []  # a multi-label row: its class is its first label (or good, below)
        if missing:
            raise UserError(
                f"{location}: missing {', '.join(missing)} (columns found: {sorted(row)}; a manifest "
                "needs path and label (or labels) and may have split, mask plus any other columns)"
            )
        source = str(row["path"])
        split = _text(row.get("split")) or None
        mask = _text(row.get("mask"))
        mask = _resolve(base, mask) if mask else None
        meta = {k: v for k, v in row.items() if k not in ("label", "split", "mask")}
        label = _text(row.get("label")) or next(iter(split_labels(row["labels"])), "")
        read = partial(read_file, _resolve(base, source), mask)
        items.append(Item(label, read, source, split, meta, mask=mask))
    names = {i.label for i in items if i.label} | {
        n for i in items for n in split_labels(i.meta.get("labels"))
    }
    good = find_good(names) or "good"  # rows with no label and no defect labels are good parts
    items = [i if i.label else replace(i, label=good) for i in items]
    _missing_masks(items, where)
    return items


def render_synthetic(seed: int, index: int, size: int, multi: float = 0.0) -> Payload:
    import numpy as np
    from PIL import Image

    from data import synthetic

    pixels, _, drawn, mask = synthetic.render_part(seed, index, size, multi)
    buf = io.BytesIO()
    # Fixed quality and no optimisation passes: identical bytes on every run.
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    # The renderer's class indices → the data set's (good first, then sorted).
    order = good_first(synthetic.CLASSES)
    remap = np.array([order.index(c) for c in synthetic.CLASSES], np.uint8)
    return Payload(buf.getvalue(), "jpg", drawn, encode_mask(remap[mask]))


def render_large(seed: int, index: int, width: int, height: int) -> Payload:
    import numpy as np

    from data import synthetic_large as large

    pixels, _, drawn, mask = large.render_large(seed, index, width, height)
    order = good_first(large.CLASSES)
    remap = np.array([order.index(c) for c in large.CLASSES], np.uint8)
    return Payload(large.encode_jpeg(pixels), "jpg", drawn, encode_mask(remap[mask]))


def from_synthetic(
    num_samples: int, seed: int, size: int, multi: float = 0.0, large: Sequence[int] | None = None
) -> list[Item]:
    """The embedded set; `multi`: the share of defective parts with defects of several kinds;
    `large` (width, height): whole large parts with small defects instead (data/synthetic_large.py)."""
    if large:
        from data import synthetic_large as gen

        w, h = (int(v) for v in large)
        name, render = "synthetic-large", partial(render_large, width=w, height=h)
    else:
        from data import synthetic as gen

        name, render = "synthetic", partial(render_synthetic, size=size, multi=multi)
    return [
        Item(
            gen.CLASSES[gen.label_of(seed, i)],
            partial(render, seed, i),
            f"{name}:{seed}/{i}",
            meta={"source": f"{name}:{seed}/{i}"},
            mask=f"{name}:{seed}/{i}",
        )
        for i in range(num_samples)
    ]
