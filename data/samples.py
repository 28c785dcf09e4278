"""What a sample is inside a shard: torch-free, shared by the loader and `data verify`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import fsspec
from webdataset.tariterators import group_by_keys, tar_file_iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class BadSample(ValueError):
    """A sample that cannot train: the message is the reason, counted per kind."""


def tar_samples(fileobj: BinaryIO, url: str) -> Iterator[dict]:
    """{"__key__", "__url__", "jpg", "cls", ...} in file order; files are grouped by key as
    webdataset does, and nothing is decoded, unpickled or executed."""
    files = ({**file, "__url__": url} for file in tar_file_iterator(fileobj))
    return group_by_keys(files)


def read_shard(url: str) -> Iterator[dict]:
    """The samples of the shard at `url` (a path or any fsspec URL), streamed in file order."""
    with fsspec.open(url, "rb") as f:
        yield from tar_samples(f, url)


def image_bytes(sample: dict) -> bytes:
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        raise BadSample("no image")
    return image


def label(sample: dict, num_classes: int) -> int:
    try:
        value = int(sample["cls"])
    except (KeyError, ValueError):
        raise BadSample("missing or non-integer label") from None
    if not 0 <= value < num_classes:  # would crash the loss (on a GPU, opaquely)
        raise BadSample("label out of range")
    return value
