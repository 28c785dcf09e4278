"""Items → `{split}-000000.tar …` + `dataset.json`, deterministically and in parallel.

A sample is `KEY.jpg|png|webp|tif|bmp`, `KEY.cls` (the class index as text), `KEY.json` (source path
and any manifest columns, `labels` among them) and, where the source has one, `KEY.mask.png` (class
indices, 0 the good class: a data set with masks lists its good class first): plain WebDataset,
so `tar tf` and `webdataset.WebDataset` read it.
Same items and options give byte-identical shards: images are copied as they are (JPEG, PNG,
WebP, TIFF and BMP, so 16-bit camera images stay lossless; anything else PIL reads is re-encoded
as PNG), tar headers carry no time or owner, and the worker pool returns results in input order.
16-bit images are checked against `--bit-depth N` (a value over 2^N - 1 stops the write), which
dataset.json then records as `bit_depth` for the loader to scale by (data/decode.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing import get_context

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from data.errors import UserError
from data.index import INDEX_NAME, DatasetIndex, Shard, join_url, load_index
from data.intake import DeepPayload, Refused, TooDeep, hashed
from data.publish import first_number, publish
from data.sources import Item
from data.tar_write import write_shards
from data.targets import good_first, split_labels
from data.versions import Seen, known_images, next_key, versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteReport:
    index: DatasetIndex
    written: int
    skipped: Counter  # reason → count
    skipped_examples: list[str]  # the first few "source: reason"
    seconds: float
    duplicates: int = 0  # an append's images the data set already held (same bytes), left out
    version: int = 1  # the data set's version after this write
    shards: int = 0  # written by this run
    kept: int = 0  # --ray: groups an earlier, interrupted run of the same write had written


def assign_splits(items: list[Item], val_fraction: float, seed: int) -> dict[str, list[Item]]:
    """Stratified, seeded train/val split for items without one; then each split is shuffled so
    shards mix classes (a class-sorted shard would make every batch one class)."""
    splits: dict[str, list[Item]] = {}
    by_label: dict[str, list[Item]] = {}
    for item in items:
        if item.split:
            splits.setdefault(item.split, []).append(item)
        else:
            by_label.setdefault(item.label, []).append(item)
    rng = np.random.default_rng(seed)
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        n_val = round(len(group) * val_fraction)
        splits.setdefault("val", []).extend(group[i] for i in order[:n_val])
        for i in order[n_val:]:
            splits.setdefault(group[i].rest, []).append(group[i])
    return {
        name: [split[i] for i in rng.permutation(len(split))]
        for name, split in sorted(splits.items())
        if split
    }


@dataclass
class Tally:
    """What a write left out: unreadable files per reason (the first few named), and images the
    data set already held (an append's duplicates). Groups written apart add up in order."""

    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few "source: reason"
    duplicates: int = 0
    deep_bits: int = 0  # the most bits 16-bit images declaring no depth use: a --bit-depth hint

    def add(self, other: Tally) -> None:
        self.skipped.update(other.skipped)
        self.examples = (self.examples + other.examples)[:5]
        self.duplicates += other.duplicates
        self.deep_bits = max(self.deep_bits, other.deep_bits)


def _checked(items, loaded, classes, keys, group_size: int, tally: Tally, seen: Seen | None = None):
    """(item, (payload or reason, sha256)) → (group, key, payload, class index, json, sha256);
    skips and duplicates are counted. An item's group is its place in the split // group_size."""
    for n, (item, (payload, digest)) in enumerate(zip(items, loaded, strict=True)):
        if isinstance(payload, TooDeep):
            raise UserError(f"{item.source}: {payload}. Nothing was written")
        if isinstance(payload, Refused):
            raise UserError(
                f"{item.mask}: {payload}; write masks as single-channel PNG of class indices (or 0/255 for "
                "the row's label). Nothing was written"
            )
        if isinstance(payload, str):
            tally.skipped[payload.split(":")[0]] += 1
            if len(tally.examples) < 5:
                tally.examples.append(f"{item.source}: {payload}")
            continue
        if seen is not None and digest in seen:
            tally.duplicates += 1
            continue
        if isinstance(payload, DeepPayload):
            tally.deep_bits = max(tally.deep_bits, payload.used)
        meta = {**item.meta, **payload.meta}
        yield n // group_size, keys[n], payload, classes.index(item.label), meta, digest


def write_group(
    items: list[Item], keys: list[str], classes: tuple[str, ...], jobs: list, out_dir: str, name_of,
    shard_bytes: int, seen: Seen | None,
) -> tuple[list[tuple[Shard, list[bytes]]], Tally]:  # fmt: skip
    """One group's shards, read and written in this process (a Ray task's work)."""
    tally = Tally()
    samples = _checked(items, map(hashed, jobs), classes, keys, len(items) or 1, tally, seen)
    return list(write_shards(samples, out_dir, name_of, len(items) or 1, shard_bytes)), tally


def _classes(items: list[Item], masked: bool, old: DatasetIndex | None) -> tuple[str, ...]:
    labels = sorted({i.label for i in items} | {n for i in items for n in split_labels(i.meta.get("labels"))})
    if old is not None:  # an append keeps the data set's classes and their indices
        new = [c for c in labels if c not in old.classes]
        if new:
            raise UserError(
                f"--append: the new images have classes the data set lacks: {', '.join(new[:10])} (it has "
                f"{', '.join(old.classes)}); a new class changes every label index: write a new data set "
                "with all images instead"
            )
        if old.label != "cls":
            raise UserError(f"--append: {old.location} keeps labels in {old.label}, the writer in KEY.cls")
        return old.classes
    if len(labels) < 2:
        raise UserError(f"the source has a single class {labels}: a classifier needs at least two")
    return good_first(labels) if masked else tuple(labels)  # mask value 0: the good class


def _write_local(splits, keys, classes, jobs_of, tmp, name_of, shard_samples, shard_bytes, workers, seen):
    """Every split's shards, checked in a process pool and written here, in listing order."""
    tally, written = Tally(), {}
    pool = get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for name, split_items in splits.items():
            jobs = [jobs_of(i) for i in split_items]
            loaded = pool.imap(hashed, jobs, chunksize=16) if pool else map(hashed, jobs)
            samples = _checked(split_items, loaded, classes, keys[name], shard_samples, tally, seen)
            written[name] = list(
                write_shards(samples, tmp, partial(name_of, name), shard_samples, shard_bytes)
            )
    finally:
        if pool:
            pool.terminate()
    moves = [os.path.join(tmp, s.url) for parts in written.values() for s, _ in parts]
    return written, tally, moves


def _append_depth(old: DatasetIndex, bit_depth: int | None) -> int | None:
    """The bit depth an append writes at: the data set's, which a --bit-depth given must match."""
    had = old.extra.get("bit_depth")
    if bit_depth is not None and bit_depth != had:
        written = f"with --bit-depth {had}" if had else "without --bit-depth (each file at its own depth)"
        again = f"--bit-depth {had}" if had else "no --bit-depth"
        raise UserError(
            f"--append --bit-depth {bit_depth}: {old.location} was written {written}; append with {again}, "
            "or write a new data set"
        )
    return had


def write_dataset(
    items: list[Item],
    out_dir: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_samples: int = 10_000,
    shard_size_mb: float = 256.0,
    workers: int | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
    bit_depth: int | None = None,
    append: bool = False,
    ray: str | None = None,
) -> WriteReport:
    """Write items as shards plus `dataset.json` into `out_dir` (`append`: as a new version of the
    data set there, leaving its shards as they are; `ray`: as Ray tasks, data/ray_write.py).

    Shards go to a hidden temporary directory first and are moved into place before the index
    is written, so an interrupted write leaves either the old data set or none, never a mix.
    """
    start = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(out_dir)
    local = isinstance(fs, LocalFileSystem)
    if not items:
        raise UserError("the source has no images (expected image files, one subfolder per class)")
    if append and overwrite:
        raise UserError("--append adds to the data set and --overwrite replaces it: pass one of them")
    exists = fs.exists(f"{root}/{INDEX_NAME}")
    if exists and not (overwrite or append):
        raise UserError(
            f"{out_dir} already holds a data set (pass --append to add these images as a new version, "
            "or --overwrite to replace it)"
        )
    old = load_index(out_dir) if append and exists else None
    if old is not None:  # appended images decode as the data set's do: at its depth
        bit_depth = _append_depth(old, bit_depth)
    masked = any(i.mask for i in items)
    classes = _classes(items, masked, old)
    splits = assign_splits(items, val_fraction, seed)
    # Keys number the items in listing order (an append's go on from the data set's): stable,
    # unique across splits and versions, free of dots.
    base = next_key(old) if old else 0
    key_of = {id(item): f"{base + n:08d}" for n, item in enumerate(items)}
    keys = {name: [key_of[id(i)] for i in split_items] for name, split_items in splits.items()}
    held = known_images(old) if old else None  # (n, 32) sha256 of the images it holds, in order
    seen = Seen(held) if old else None
    # An index without versions (older, or another tool's) holds version 1 as it is.
    version = (len(versions(old)) or 1) + 1 if old else 1
    first = {name: first_number(old, name) for name in splits}
    shard_bytes = int(shard_size_mb * 2**20)

    def jobs_of(item: Item) -> tuple:
        return item, classes.index(item.label), len(classes), bit_depth

    def name_of(split: str, n: int) -> str:
        return f"{split}-{first[split] + n:06d}.tar"

    if local:
        os.makedirs(root, exist_ok=True)
    kept = 0
    if ray:
        from data import ray_write

        groups = [
            (name, g, split_items[g * shard_samples : (g + 1) * shard_samples],
             keys[name][g * shard_samples : (g + 1) * shard_samples],
             [jobs_of(i) for i in split_items[g * shard_samples : (g + 1) * shard_samples]])
            for name, split_items in splits.items()
            for g in range(-(-len(split_items) // shard_samples))
        ]  # fmt: skip
        options = [classes, shard_samples, shard_bytes, bit_depth, base, old.sha256 if old else None]
        staging = join_url(out_dir.rstrip("/"), f".writing-ray-{ray_write.fingerprint(groups, options)[:16]}")
        written, tally, moves, kept = ray_write.write_on_ray(ray, groups, classes, staging, shard_bytes, seen)
        tmp = None
        # Staged parts take their final names in order, as the local writer numbers them.
        written = {
            name: [(replace(s, url=name_of(name, n)), d) for n, (s, d) in enumerate(parts)]
            for name, parts in written.items()
        }
    else:
        # Shards are written locally first: inside out_dir on a local disk (so publishing them is a
        # rename), in a temporary directory for object storage (then uploaded one by one).
        tmp = tempfile.mkdtemp(prefix=".writing-", dir=root if local else None)
        try:
            written, tally, moves = _write_local(
                splits, keys, classes, jobs_of, tmp, name_of, shard_samples, shard_bytes,
                workers or os.cpu_count() or 1, seen,
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        total = sum(s.num_samples for parts in written.values() for s, _ in parts)
        if not total and not (old and tally.duplicates):  # before anything old is touched
            raise UserError(f"no readable images among {len(items)} files ({tally.examples[:3]})")
        new_shards = [s for parts in written.values() for s, _ in parts]
        if not total:  # an append of images the data set already holds: nothing changes
            index = old
        else:
            index = publish(
                fs, root, out_dir, local, old, classes, written, moves, version, base, len(items),
                tally, extra, masked, bit_depth, held,
            )  # fmt: skip
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if ray:
            fs.rm(fsspec.core.url_to_fs(staging)[1], recursive=True)
    if bit_depth is None and 0 < tally.deep_bits < 16:
        log.info(
            "the 16-bit images' values all fit in %d bits (at most %d), so they decode as 16-bit, dark: "
            "pass --bit-depth %d if the camera is %d-bit",
            tally.deep_bits,
            (1 << tally.deep_bits) - 1,
            tally.deep_bits,
            tally.deep_bits,
        )
    return WriteReport(
        index, total, tally.skipped, tally.examples, time.perf_counter() - start,
        tally.duplicates, version if total else version - 1, len(new_shards), kept,
    )  # fmt: skip
