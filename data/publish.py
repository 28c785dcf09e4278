"""Publishing a write: shards into place, the version's image list, then the index, last.

An interrupted publish leaves the old data set readable (an append) or no index at all (an
overwrite drops the old index first), never an index that names shards that are not there.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace

from data.errors import UserError
from data.index import INDEX_NAME, DatasetIndex, Split, join_url, load_index, save_index
from data.versions import content_sha256, images_name, known_images, next_key, versions


def remove_index(fs, root: str, out_dir: str) -> set[str]:
    """Drop an existing index first: from here until the new one lands the directory holds no
    data set, rather than an index that points at shards being replaced. Returns the files of the
    old data set (shards, version files), which the new one may not all replace."""
    path = f"{root}/{INDEX_NAME}"
    if not fs.exists(path):
        return set()
    try:
        old = load_index(out_dir)
    except UserError:  # unreadable: nothing to learn about stale shards from it
        fs.rm(path)
        return set()
    fs.rm(path)
    files = {s.url for split in old.splits.values() for s in split.shards}
    return {f for f in files | {v["images"] for v in versions(old)} if "/" not in f}


def first_number(old: DatasetIndex | None, split: str) -> int:
    """Where an append's shard numbering of `split` goes on: past every `split-NNNNNN.tar`."""
    if old is None or split not in old.splits:
        return 0
    numbers = [re.fullmatch(rf"{re.escape(split)}-(\d+)\.tar", s.url) for s in old.splits[split].shards]
    return 1 + max((int(m.group(1)) for m in numbers if m), default=len(old.splits[split].shards) - 1)


def publish(fs, root, out_dir, local, old, classes, written, moves, version, base, listed, tally, extra,
             masked, bit_depth, held=None) -> DatasetIndex:  # fmt: skip
    """Shards into place, then the version's image list, then the index, last. `held`: the
    sha256s of the images an appended-to data set holds, in order (its version 1's, if it has no
    versions yet)."""
    stale = set() if old else remove_index(fs, root, out_dir)
    finals = [s.url for parts in written.values() for s, _ in parts]
    if old:
        listed_urls = {s.url for split in old.splits.values() for s in split.shards}
        clash = sorted(set(finals) & listed_urls)
        if clash:  # never: numbering goes on past the data set's; a guard for hand-edited indices
            raise UserError(f"--append would overwrite {clash[0]} of the data set; nothing was written")
    for src, name in zip(moves, finals, strict=True):
        if local:
            os.replace(src, os.path.join(root, name))
        elif "://" not in src and os.path.exists(src):
            fs.put_file(src, f"{root}/{name}")
        else:
            fs.mv(src, f"{root}/{name}")
    digests = b"".join(d for parts in written.values() for _, ds in parts for d in ds)
    images = images_name(version)
    if local:
        with open(os.path.join(root, images), "wb") as f:
            f.write(digests)
    else:
        fs.pipe_file(f"{root}/{images}", digests)
    for name in stale - set(finals) - {images}:  # files of a replaced data set the new one lacks
        fs.rm(f"{root}/{name}")
    splits = {name: Split(tuple(s for s, _ in parts)) for name, parts in written.items()}
    if old:
        merged = dict(old.splits)
        for name, split in splits.items():
            merged[name] = Split(merged.get(name, Split(())).shards + split.shards)
        info, history = dict(old.extra), _history(old, fs, root, local, held)
    else:
        merged, history = splits, []
        info = {"created_by": extra or {}}
        if masked:
            info["masks"] = True  # KEY.mask.png where a sample has defect pixels: task=segment can train
        if bit_depth:
            info["bit_depth"] = bit_depth  # 16-bit images' significant bits: the loader scales by it
    entry = {
        "version": version,
        "shards": {name: [s.url for s in split.shards] for name, split in splits.items()},
        "samples": sum(split.num_samples for split in splits.values()),
        "duplicates": tally.duplicates,
        "keys": [base, base + listed],
        "images": images,
        "images_sha256": hashlib.sha256(digests).hexdigest(),
        "sha256": content_sha256(merged),
        "created_by": extra or {},
    }
    info["versions"] = [*history, entry]
    index = DatasetIndex(classes, merged, extra=info, label=old.label if old else "cls")
    url = join_url(out_dir.rstrip("/"), INDEX_NAME) if not local else os.path.join(root, INDEX_NAME)
    sha = save_index(index, url)
    return replace(index, location=url, sha256=sha)


def _history(old: DatasetIndex, fs, root: str, local: bool, held) -> list[dict]:
    """The versions before this append; a data set without them (written before versions were
    recorded, or another tool's, indexed) becomes version 1 as it is, its images listed once."""
    known = versions(old)
    if known:
        return known
    digests = (known_images(old) if held is None else held).tobytes()
    name = images_name(1)
    if local:
        with open(os.path.join(root, name), "wb") as f:
            f.write(digests)
    else:
        fs.pipe_file(f"{root}/{name}", digests)
    return [
        {
            "version": 1,
            "shards": {n: [s.url for s in split.shards] for n, split in old.splits.items()},
            "samples": sum(split.num_samples for split in old.splits.values()),
            "duplicates": 0,
            "keys": [0, next_key(old)],
            "images": name,
            "images_sha256": hashlib.sha256(digests).hexdigest(),
            "sha256": content_sha256(old.splits),
            "created_by": old.extra.get("created_by", {}),
        }
    ]
