"""What a sample is inside a shard: torch-free, shared by the loader and `data verify`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import fsspec

from data.tar import TarError, tar_files

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


class BadSample(ValueError):
    """A sample that cannot train: the message is the reason, counted per kind."""


# The reason of samples a task leaves out on purpose (task=anomaly trains on good parts only):
# counted and reported, but never bad data, so never held against data.max_bad_fraction.
LEFT_OUT = "left out: a defect sample in the train split (task=anomaly learns from good parts only)"


def is_left_out(reason: str) -> bool:
    return reason.startswith("left out")


def tar_samples(fileobj: BinaryIO, url: str) -> Iterator[dict]:
    """{"__key__", "__url__", "jpg", "cls", ...} in file order. Files are grouped into samples
    as webdataset groups them: the key is the path up to the first dot of the file name, the
    rest (lower-cased) names the entry; nothing is decoded, unpickled or executed."""
    sample: dict | None = None
    for name, data in tar_files(fileobj):
        dot = name.find(".", name.rfind("/") + 1)
        if dot < 0:
            continue  # no extension: not part of any sample
        key, ext = name[:dot], name[dot + 1 :].lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        elif ext in sample:
            raise TarError(f"{name}: the sample holds two {ext!r} files")
        sample[ext] = data
    if sample is not None:
        yield sample


def read_shard(url: str) -> Iterator[dict]:
    """The samples of the shard at `url` (a path or any fsspec URL), streamed in file order."""
    with fsspec.open(url, "rb") as f:
        yield from tar_samples(f, url)


def image_bytes(sample: dict) -> bytes:
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        raise BadSample("no image")
    if not image:
        raise BadSample("empty image")
    return image


@dataclass(frozen=True)
class Labels:
    """Reads a sample's class index. `source` "cls": `KEY.cls` holds it as text (the WebDataset
    convention). "json:FIELD": that field of `KEY.json` holds the index or the class name."""

    classes: tuple[str, ...]
    source: str = "cls"

    def __post_init__(self):
        if self.source != "cls" and not (self.source.startswith("json:") and len(self.source) > 5):
            raise ValueError(f"label source {self.source!r}: expected 'cls' or 'json:FIELD'")

    def __call__(self, sample: dict) -> int:
        value = self.raw(sample)
        if isinstance(value, str):
            if value not in self.classes:
                raise BadSample("unknown class name")
            return self.classes.index(value)
        if not 0 <= value < len(self.classes):  # would crash the loss (on a GPU, opaquely)
            raise BadSample("label out of range")
        return value

    def raw(self, sample: dict) -> int | str:
        """The label as stored: an integer, or (from JSON only) a class name."""
        if self.source == "cls":
            try:
                return int(sample["cls"])
            except (KeyError, ValueError):
                raise BadSample("missing or non-integer label") from None
        field = self.source[5:]
        try:
            value = json.loads(sample["json"])[field]
        except (KeyError, ValueError, TypeError):
            raise BadSample(f"no {field!r} in KEY.json") from None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise BadSample("missing or non-integer label")
        return value
