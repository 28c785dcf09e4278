"""`python -m data index DIR`: a dataset.json for shards that other tools wrote.

webdataset's ShardWriter, img2dataset and hand-made tars hold the same `KEY.jpg` + `KEY.cls`
samples as ours but no index. This reads every shard once (count, size, sha256, labels) and
writes the index beside them. Splits come from the file names: `train-000000.tar`,
`val_0001.tar`, `test.tar` ...; a shard whose name starts with no known split goes to `train`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import fsspec

from data.errors import UserError
from data.index import INDEX_NAME, DatasetIndex, Shard, Split, join_url, save_index
from data.samples import tar_samples

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def split_of(name: str) -> str:
    """The split a shard file name announces (`val-000003.tar` → val), or train."""
    match = re.match(r"([a-z]+)", os.path.basename(name).lower())
    word = match.group(1) if match else ""
    if word in ("valid", "validation"):
        return "val"
    return word if word in SPLIT_NAMES else "train"


def scan_shard(url: str) -> tuple[Shard, int]:
    """The shard's index entry, and the largest label it holds (-1 if none)."""
    with fsspec.open(url, "rb") as f:
        raw = f.read()
    count, top = 0, -1
    try:
        for sample in tar_samples(io.BytesIO(raw), url):
            count += 1
            if "cls" in sample:
                top = max(top, int(sample["cls"]))
    except ValueError as e:
        raise UserError(f"{url}: a label is not an integer ({e}); .cls must hold the class index") from None
    except Exception as e:  # a broken tar cannot be indexed reliably
        raise UserError(f"{url}: not a readable tar ({str(e).split(' @ ')[0]})") from None
    return Shard(os.path.basename(url), count, len(raw), hashlib.sha256(raw).hexdigest()), top


def build_index(directory: str, classes: list[str] | None = None, overwrite: bool = False) -> DatasetIndex:
    fs, root = fsspec.core.url_to_fs(directory)
    index_url = join_url(directory.rstrip("/"), INDEX_NAME)
    if fs.exists(f"{root}/{INDEX_NAME}") and not overwrite:
        raise UserError(f"{index_url} exists (pass --overwrite to rebuild it)")
    names = sorted(os.path.basename(p) for p in fs.glob(f"{root}/*.tar"))
    if not names:
        raise UserError(f"{directory}: no .tar shards here")
    splits: dict[str, list[Shard]] = {}
    top = -1
    for name in names:
        shard, shard_top = scan_shard(join_url(directory.rstrip("/"), name))
        splits.setdefault(split_of(name), []).append(shard)
        top = max(top, shard_top)
    if top < 0:
        raise UserError(f"{directory}: no sample has a .cls label (KEY.cls with the class index)")
    if classes is None:
        classes = [str(c) for c in range(top + 1)]
    elif len(classes) <= top:
        raise UserError(f"--classes names {len(classes)} classes, but the shards use labels up to {top}")
    index = DatasetIndex(
        tuple(classes),
        {k: Split(tuple(v)) for k, v in splits.items()},
        extra={"created_by": {"index": directory}},
    )
    sha = save_index(index, index_url if "://" in index_url else os.path.join(root, INDEX_NAME))
    return DatasetIndex(index.classes, index.splits, index_url, sha, index.extra)
