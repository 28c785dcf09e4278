"""`python -m data index DIR`: a dataset.json for shards that other tools wrote.

webdataset's ShardWriter, img2dataset and hand-made tars hold the same `KEY.jpg` + `KEY.cls`
samples as ours but no index. This reads every shard once (count, size, sha256, labels) and
writes the index beside them. Labels kept in `KEY.json` instead (`--label json:FIELD`) may be
class indices or class names; names become the class list, sorted, unless `--classes` orders
them. Splits come from the file names: `train-000000.tar`, `val_0001.tar`, `test.tar` ...; a
shard whose name starts with no known split goes to `train`, and `--val-fraction F` moves whole
train shards (about F of the samples, drawn by `--seed`) to `val`. Gzipped shards (`.tar.gz`,
`.tgz`) are indexed as they are.
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import fsspec
import numpy as np

from data.decode import open_image
from data.errors import UserError
from data.index import INDEX_NAME, DatasetIndex, Shard, Split, join_url, save_index
from data.samples import BadSample, Labels, image_bytes, tar_samples
from data.tiles import run_lengths

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")  # gzipped tars read as webdataset reads them (data/tar.py)


def split_of(name: str) -> str:
    """The split a shard file name announces (`val-000003.tar` → val), or train."""
    match = re.match(r"([a-z]+)", os.path.basename(name).lower())
    word = match.group(1) if match else ""
    if word in ("valid", "validation"):
        return "val"
    return word if word in SPLIT_NAMES else "train"


def scan_shard(url: str, labels: Labels) -> tuple[Shard, set[int | str]]:
    """The shard's index entry, and the labels it holds as stored (indices or class names)."""
    with fsspec.open(url, "rb") as f:
        raw = f.read()
    count, found, sizes = 0, set(), []
    try:
        for sample in tar_samples(io.BytesIO(raw), url):
            count += 1
            sizes.append(_size(sample))
            try:
                found.add(labels.raw(sample))
            except BadSample as e:
                if labels.source == "cls" and "cls" in sample:  # present but unreadable
                    raise UserError(
                        f"{url}: a label is not an integer ({e}); .cls must hold the class index"
                    ) from None
    except UserError:
        raise
    except Exception as e:  # a broken tar cannot be indexed reliably
        raise UserError(f"{url}: not a readable tar ({str(e).split(' @ ')[0]})") from None
    runs = () if None in sizes else tuple(map(tuple, run_lengths(sizes)))
    return Shard(os.path.basename(url), count, len(raw), hashlib.sha256(raw).hexdigest(), runs), found


def _size(sample: dict) -> tuple[int, int] | None:
    """The image's (width, height) from its header; None if it has none readable (the loader
    counts such a sample as bad; the index then records no sizes for the shard)."""
    try:
        with open_image(image_bytes(sample)) as im:
            return im.size
    except Exception:  # PIL raises many types for unreadable headers
        return None


def build_index(
    directory: str,
    classes: list[str] | None = None,
    overwrite: bool = False,
    label: str = "cls",
    val_fraction: float = 0.0,
    seed: int = 0,
) -> DatasetIndex:
    """Scan the shards in `directory` and write their dataset.json beside them; `val_fraction`:
    whole train shards (about that share of the samples) become the val split."""
    fs, root = fsspec.core.url_to_fs(directory)
    index_url = join_url(directory.rstrip("/"), INDEX_NAME)
    if fs.exists(f"{root}/{INDEX_NAME}") and not overwrite:
        raise UserError(f"{index_url} exists (pass --overwrite to rebuild it)")
    names = sorted({os.path.basename(p) for ext in SHARD_EXTS for p in fs.glob(f"{root}/*{ext}")})
    if not names:
        raise UserError(f"{directory}: no shards here (.tar, .tar.gz or .tgz files)")
    try:
        reader = Labels((), label)
    except ValueError as e:
        raise UserError(f"--label: {e}") from None
    splits: dict[str, list[Shard]] = {}
    found: set[int | str] = set()
    for name in names:
        shard, labels = scan_shard(join_url(directory.rstrip("/"), name), reader)
        splits.setdefault(split_of(name), []).append(shard)
        found |= labels
    if val_fraction:
        splits = split_off_val(directory, splits, val_fraction, seed)
    index = DatasetIndex(
        tuple(_classes(directory, label, found, classes)),
        {k: Split(tuple(v)) for k, v in splits.items()},
        extra={"created_by": {"index": directory}},
        label=label,
    )
    sha = save_index(index, index_url if "://" in index_url else os.path.join(root, INDEX_NAME))
    return DatasetIndex(index.classes, index.splits, index_url, sha, index.extra, label)


def split_off_val(
    directory: str, splits: dict[str, list[Shard]], fraction: float, seed: int
) -> dict[str, list[Shard]]:
    """Whole train shards, drawn by `seed`, into val until it holds about `fraction` of the
    samples: a shard is the unit other tools wrote, and the index can only list whole ones."""
    if "val" in splits:
        raise UserError(
            f"{directory}: the shards already have a val split ({len(splits['val'])} shards named val*); "
            "drop --val-fraction, or rename them"
        )
    train = splits.get("train", [])
    if len(train) < 2:
        raise UserError(
            f"{directory}: --val-fraction needs at least 2 train shards to move whole ones to val "
            f"(found {len(train)}); write smaller shards, or a manifest with a split column"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    goal, val, taken = fraction * sum(s.num_samples for s in train), set(), 0
    for i in order:  # in drawn order, each shard that brings val nearer the goal; one stays
        if abs(taken + train[i].num_samples - goal) < abs(taken - goal) and len(val) < len(train) - 1:
            val.add(int(i))
            taken += train[i].num_samples
    if not val:  # every shard alone overshoots twice over: the smallest one
        val.add(int(min(order, key=lambda i: train[i].num_samples)))
    return {
        **splits,
        "train": [s for j, s in enumerate(train) if j not in val],
        "val": [s for j, s in enumerate(train) if j in val],
    }


def _classes(directory: str, label: str, found: set[int | str], classes: list[str] | None) -> list[str]:
    """The class list: `classes` if given and it covers every label found, else made from them."""
    where = "KEY.cls with the class index" if label == "cls" else f"{label[5:]!r} in KEY.json"
    if not found:
        raise UserError(f"{directory}: no sample has a label ({where})")
    names = {v for v in found if isinstance(v, str)}
    if names and len(names) < len(found):
        raise UserError(f"{directory}: {where} holds both class names and indices; use one kind")
    if names:
        unknown = sorted(names - set(classes or names))
        if unknown:
            raise UserError(f"--classes does not name {', '.join(unknown[:5])}, which the shards use")
        return classes or sorted(names)
    top = max(found)
    if classes is None:
        return [str(c) for c in range(top + 1)]
    if len(classes) <= top:
        raise UserError(f"--classes names {len(classes)} classes, but the shards use labels up to {top}")
    return classes
