"""Items → `{split}-000000.tar …` + `dataset.json`, deterministically and in parallel.

A sample is `KEY.jpg|png|webp`, `KEY.cls` (the class index as text), `KEY.json` (source path
and any manifest columns, `labels` among them) and, where the source has one, `KEY.mask.png` (class
indices, 0 the good class: a data set with masks lists its good class first): plain WebDataset,
so `tar tf` and `webdataset.WebDataset` read it.
Same items and options give byte-identical shards: images are copied as they are (JPEG, PNG and
WebP; anything else PIL reads is re-encoded as PNG), tar headers carry no time or owner, and
the worker pool returns results in input order.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from data.decode import decode_fully, open_image
from data.errors import UserError
from data.index import INDEX_NAME, DatasetIndex, Shard, Split, join_url, load_index, save_index
from data.sources import Item, Payload
from data.targets import good_first, split_labels
from data.tiles import run_lengths

log = logging.getLogger(__name__)

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
TAR_TRAILER = 2 * 512 + tarfile.RECORDSIZE  # end-of-archive blocks plus worst-case record padding


@dataclass(frozen=True)
class WriteReport:
    index: DatasetIndex
    written: int
    skipped: Counter  # reason → count
    skipped_examples: list[str]  # the first few "source: reason"
    seconds: float


def check_image(payload: Payload) -> Payload:
    """Decode fully (at reduced scale where the format allows): a file that fails here would fail
    every epoch of every run, so it is cheaper to drop it once now."""
    head = open_image(payload.data)
    size = head.size  # read here, in the worker: the index records it, and the reduced decode shrinks it
    with decode_fully(head) as im:
        fmt = im.format
        if fmt in KEPT_FORMATS:
            return Payload(payload.data, KEPT_FORMATS[fmt], payload.meta, payload.mask, size)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return Payload(buf.getvalue(), "png", payload.meta, payload.mask, size)


class Refused(str):
    """A source file that must not be written at all (a colour or lossy mask): the write stops."""


def check_mask(payload: Payload, label: int, num_classes: int) -> str | None:
    """Why a payload's mask cannot be written: Refused (wrong kind of file), or a reason to
    skip the item (another size than its image, values out of range); None when it is fine."""
    from data.decode import open_image
    from data.samples import BadSample
    from data.targets import mask_classes, read_mask

    try:
        mask = read_mask(payload.mask)
    except BadSample as e:
        return Refused(str(e))
    except Exception as e:  # PIL raises many types for unreadable files
        return Refused(f"unreadable mask: {e}".splitlines()[0][:200])
    with open_image(payload.data) as im:
        if mask.shape != (im.height, im.width):
            return f"mask size differs: {mask.shape[1]}x{mask.shape[0]}, image {im.width}x{im.height}"
    try:
        mask_classes(mask, label, num_classes)
    except BadSample as e:
        return f"{e}: values up to {int(mask.max())}, {num_classes} classes"
    return None


def _load(job: tuple[Item, int, int]) -> Payload | str:
    """Runs in a worker: the checked payload, or why the item is skipped ("reason: detail")."""
    from PIL import UnidentifiedImageError

    item, label, num_classes = job
    try:
        payload = item.read()
        if item.mask is None:  # the data set's masks are those its items declare
            payload = Payload(payload.data, payload.ext, payload.meta)
        if payload.mask is not None:
            problem = check_mask(payload, label, num_classes)
            if problem:
                return problem
        return check_image(payload)
    except UnidentifiedImageError:
        return "not an image: PIL cannot identify it"
    except FileNotFoundError as e:
        return f"missing file: {e.filename}"
    except Exception as e:  # PIL raises many types for corrupt data; skip and report, never fatal
        return f"corrupt image: {e}".splitlines()[0][:200]


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


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes, so no shard is read twice."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[tuple[str, Payload, int, dict]],
    out_dir: str,
    split: str,
    shard_samples: int,
    shard_bytes: int,
) -> Iterator[Shard]:
    """(key, payload, class index, json) → shards of at most `shard_samples` samples and about
    `shard_bytes` bytes (a shard closes before the sample that would overflow it)."""
    tar = f = w = None
    count = size = 0
    number = 0

    sizes: list[tuple[int, int]] = []  # the open shard's image sizes, in sample order

    def close() -> Shard:
        tar.close()
        f.close()
        return Shard(name, count, w.n, w.sha.hexdigest(), tuple(map(tuple, run_lengths(sizes))))

    for key, payload, label, meta in samples:
        entries = [(f"{key}.{payload.ext}", payload.data), (f"{key}.cls", str(label).encode())]
        if meta:
            entries.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
        if payload.mask is not None:
            entries.append((f"{key}.mask.png", payload.mask))
        sample_bytes = sum(512 + len(d) + 511 for _, d in entries)  # header + padded body
        if tar and (count >= shard_samples or size + sample_bytes > shard_bytes):
            yield close()
            tar = None
        if tar is None:
            name = f"{split}-{number:06d}.tar"
            number += 1
            f = open(os.path.join(out_dir, name), "wb")  # noqa: SIM115 (closed by close())
            w = _HashingWriter(f)
            tar = tarfile.open(fileobj=w, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            count, size, sizes = 0, TAR_TRAILER, []
        sizes.append(payload.size or open_image(payload.data).size)  # checked payloads carry it
        for entry_name, data in entries:
            _add(tar, entry_name, data)
        count += 1
        size += sample_bytes
    if tar:
        yield close()


def _checked(items, payloads, classes, key_of, skipped: Counter, examples: list[str]):
    """(item, payload or reason) → (key, payload, class index, json); skips are counted."""
    for item, payload in zip(items, payloads, strict=True):
        if isinstance(payload, Refused):
            raise UserError(
                f"{item.mask}: {payload}; write masks as single-channel PNG of class indices (or 0/255 for "
                "the row's label). Nothing was written"
            )
        if isinstance(payload, str):
            skipped[payload.split(":")[0]] += 1
            if len(examples) < 5:
                examples.append(f"{item.source}: {payload}")
            continue
        yield key_of[id(item)], payload, classes.index(item.label), {**item.meta, **payload.meta}


def _remove_index(fs, root: str, out_dir: str) -> set[str]:
    """Drop an existing index first: from here until the new one lands the directory holds no
    data set, rather than an index that points at shards being replaced."""
    path = f"{root}/{INDEX_NAME}"
    if not fs.exists(path):
        return set()
    try:
        old = load_index(out_dir)
    except UserError:  # unreadable: nothing to learn about stale shards from it
        fs.rm(path)
        return set()
    fs.rm(path)
    return {s.url for split in old.splits.values() for s in split.shards if "/" not in s.url}


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
) -> WriteReport:
    """Write items as shards plus `dataset.json` into `out_dir`.

    Shards go to a hidden temporary directory first and are moved into place before the index
    is written, so an interrupted write leaves either the old data set or none, never a mix.
    """
    start = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(out_dir)
    local = isinstance(fs, LocalFileSystem)
    labels = sorted({i.label for i in items} | {n for i in items for n in split_labels(i.meta.get("labels"))})
    if not items:
        raise UserError("the source has no images (expected image files, one subfolder per class)")
    if len(labels) < 2:
        raise UserError(f"the source has a single class {labels}: a classifier needs at least two")
    if fs.exists(f"{root}/{INDEX_NAME}") and not overwrite:
        raise UserError(f"{out_dir} already holds a data set (pass --overwrite to replace it)")
    masked = any(i.mask for i in items)
    classes = good_first(labels) if masked else tuple(labels)  # mask value 0: the good class
    splits = assign_splits(items, val_fraction, seed)
    # Keys number the items in listing order: stable, unique across splits, free of dots.
    key_of = {id(item): f"{n:08d}" for n, item in enumerate(items)}

    # Shards are written locally first: inside out_dir on a local disk (so publishing them is a
    # rename), in a temporary directory for object storage (then uploaded one by one).
    if local:
        os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".writing-", dir=root if local else None)
    skipped: Counter = Counter()
    examples: list[str] = []
    written: dict[str, Split] = {}
    workers = workers or os.cpu_count() or 1
    pool = get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for name, split_items in splits.items():
            jobs = [(i, classes.index(i.label), len(classes)) for i in split_items]
            payloads = pool.imap(_load, jobs, chunksize=16) if pool else map(_load, jobs)
            samples = _checked(split_items, payloads, classes, key_of, skipped, examples)
            mb = int(shard_size_mb * 2**20)
            written[name] = Split(tuple(write_shards(samples, tmp, name, shard_samples, mb)))
        if not any(s.shards for s in written.values()):  # before anything old is touched
            raise UserError(f"no readable images among {len(items)} files ({examples[:3]})")
        old = _remove_index(fs, root, out_dir)
        for name in sorted(os.listdir(tmp)):
            if local:
                os.replace(os.path.join(tmp, name), os.path.join(root, name))
            else:
                fs.put_file(os.path.join(tmp, name), f"{root}/{name}")
        new = {s.url for split in written.values() for s in split.shards}
        for stale in old - new:  # shards of a replaced data set that the new one lacks
            fs.rm(f"{root}/{stale}")
    finally:
        if pool:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    info = {"created_by": extra or {}}
    if masked:
        info["masks"] = True  # KEY.mask.png where a sample has defect pixels: task=segment can train
    index = DatasetIndex(classes, written, extra=info)
    url = join_url(out_dir.rstrip("/"), INDEX_NAME) if not local else os.path.join(root, INDEX_NAME)
    sha = save_index(index, url)
    index = DatasetIndex(classes, written, url, sha, index.extra)
    total = sum(s.num_samples for s in written.values())
    return WriteReport(index, total, skipped, examples, time.perf_counter() - start)


def synthetic_index(
    num_samples: int, seed: int, image_size: int, cache_dir: str, multi: float = 0.0, large=None
) -> str:
    """Where the embedded set with these parameters lives under `cache_dir` (v2: with masks)."""
    name = f"inspection-v2-n{num_samples}-s{seed}-{image_size}px" + (f"-multi{multi:g}" if multi else "")
    if large:  # whole large parts (data/synthetic_large.py); image_size does not apply
        name = f"inspection-large-v1-n{num_samples}-s{seed}-{large[0]}x{large[1]}"
    return os.path.join(os.path.expanduser(cache_dir), name, INDEX_NAME)


def ensure_synthetic(
    index: str, num_samples: int, seed: int, image_size: int, multi: float = 0.0, large=None
) -> str:
    """Write the embedded inspection set to `index`'s directory unless it is already there.

    Safe to call from every rank at once: a lock file lets one process write while the others
    wait, then find the index."""
    out_dir = os.path.dirname(os.path.abspath(index))
    if os.path.exists(index):
        return index
    from data.sources import from_synthetic

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        # Ranks started together (torchrun, SLURM, Ray) queue here; the first one writes.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(index):
            return index
        log.info("writing the embedded inspection set (%d images) to %s", num_samples, out_dir)
        report = write_dataset(
            from_synthetic(num_samples, seed, image_size, multi, large),
            out_dir,
            val_fraction=0.2,
            seed=seed,
            shard_samples=50 if large else 500,  # large parts: ~1-2 MB each
            extra={
                "synthetic": {
                    "num_samples": num_samples,
                    "seed": seed,
                    "image_size": image_size,
                    "multi": multi,
                    **({"large": list(large)} if large else {}),
                }
            },
        )
    log.info("wrote %d images in %.1f s", report.written, report.seconds)
    return index
