"""`python -m data verify`: check every shard against its index before a long run finds out.

Per shard: it exists, its size and sha256 match the index, it parses as a tar to the end, it
holds the listed number of samples, every sample has an image that decodes (a 16-bit one within
the data set's bit depth) and a label in range,
and a mask (KEY.mask.png), where there is one, of the image's size with class indices in range;
multi-label names (KEY.json "labels") must be classes.
Shards are checked in parallel, one process per shard at a time, each read once.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from multiprocessing import get_context

import fsspec

from data.decode import container_bits, decode_fully, decode_rgb, open_image
from data.index import DatasetIndex, Shard
from data.samples import BadSample, Labels, image_bytes, tar_samples
from data.targets import MASK_EXT, Mask, MultiHot


@dataclass(frozen=True)
class ShardCheck:
    url: str
    samples: int  # found in the tar
    problems: tuple[str, ...]


def check_shard(
    url: str, shard: Shard, labels: Labels, decode: bool = True, bit_depth: int | None = None
) -> ShardCheck:
    """Everything that can be wrong with one shard, as readable lines (at most a few per kind)."""
    try:
        with fsspec.open(url, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return ShardCheck(url, 0, ("missing",))
    problems = []
    if len(raw) != shard.num_bytes:
        problems.append(f"size {len(raw)} bytes, index says {shard.num_bytes}")
    if hashlib.sha256(raw).hexdigest() != shard.sha256:
        problems.append("sha256 differs from the index (changed or corrupted)")
    bad: dict[str, list[str]] = {}
    count = 0
    try:
        for sample in tar_samples(io.BytesIO(raw), url):
            count += 1
            reason = _check_sample(sample, labels, decode, bit_depth)
            if reason:
                bad.setdefault(reason, []).append(sample["__key__"])
    except Exception as e:  # the tar itself is broken: what follows is unreadable
        detail = str(e).split(" @ ")[0]  # webdataset appends the file object's repr
        problems.append(f"unreadable tar after {count} samples: {detail}")
    if count != shard.num_samples:
        problems.append(f"{count} samples, index says {shard.num_samples}")
    for reason, keys in bad.items():
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        problems.append(f"{reason}: {', '.join(keys[:3])}{more}")
    return ShardCheck(url, count, tuple(problems))


def _check_sample(sample: dict, labels: Labels, decode: bool, bit_depth: int | None = None) -> str | None:
    try:
        image = image_bytes(sample)
        labels(sample)
    except BadSample as e:
        return str(e)
    if decode:
        try:
            _decode(image, bit_depth)
        except BadSample as e:  # a 16-bit image's values over its depth
            return str(e)
        except Exception:
            return "image does not decode"
    try:
        MultiHot(labels)(sample)
        if MASK_EXT in sample:
            mask = Mask(labels)(sample)
            with open_image(image) as im:
                if mask.shape != (im.height, im.width):
                    return "mask size differs from its image"
    except BadSample as e:
        return str(e)
    except Exception:  # PIL's many types for a file it cannot read
        return "mask does not decode"
    return None


def _decode(image: bytes, bit_depth: int | None) -> None:
    """Decode as the loader will: a 16-bit image whole, scaled by the data set's depth (which
    its values must fit), anything else fully at reduced scale."""
    im = open_image(image)
    if container_bits(im, image) > 8:
        decode_rgb(im, 1.0, image, bit_depth)
    else:
        decode_fully(im).close()


def _check(args: tuple) -> ShardCheck:
    return check_shard(*args)


def verify(index: DatasetIndex, decode: bool = True, workers: int | None = None) -> list[ShardCheck]:
    jobs = [
        (index.shard_url(shard), shard, index.labels, decode, index.extra.get("bit_depth"))
        for split in index.splits.values()
        for shard in split.shards
    ]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        return [_check(job) for job in jobs]
    with get_context("spawn").Pool(workers) as pool:
        return pool.map(_check, jobs, chunksize=1)
