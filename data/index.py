"""`dataset.json`: the one place that knows which shards a data set has and how big they are.

Everything downstream (the epoch plan, resume, verification, lineage) plans from it, so a reader
never has to list a bucket or open a shard to learn sizes.

    {"format": "shardtrain.dataset", "version": 1, "classes": ["ok", "scratch", ...],
     "splits": {"train": {"num_samples": 2550, "num_bytes": 9175040,
                          "shards": [{"url": "train-000000.tar", "num_samples": 512,
                                      "num_bytes": 1843200, "sha256": "...",
                                      "sizes": [[4000, 3000, 512]]}, ...]},
                "val": {...}}}

Shard URLs are relative to the index's own location unless they carry a scheme or are absolute,
so a data set directory can be copied or uploaded as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from functools import cached_property

import fsspec

from data.errors import UserError
from data.samples import Labels

FORMAT = "shardtrain.dataset"
VERSION = 1
INDEX_NAME = "dataset.json"


@dataclass(frozen=True)
class Shard:
    url: str  # relative to the index location, or absolute / with a scheme
    num_samples: int
    num_bytes: int
    sha256: str
    # Image sizes in sample order, run-length [[w, h, n], ...] (one run for a fixed camera): what
    # planning every tile of every image needs (data/tiles.py). Empty: not recorded.
    sizes: tuple = ()

    def to_json(self) -> dict:
        out = {
            "url": self.url,
            "num_samples": self.num_samples,
            "num_bytes": self.num_bytes,
            "sha256": self.sha256,
        }
        return out | ({"sizes": [list(r) for r in self.sizes]} if self.sizes else {})


@dataclass(frozen=True)
class Split:
    shards: tuple[Shard, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.shards)


@dataclass(frozen=True)
class DatasetIndex:
    classes: tuple[str, ...]
    splits: dict[str, Split]
    location: str = ""  # where dataset.json was read from; shard URLs resolve against it
    sha256: str = ""  # of the dataset.json bytes: names the exact data set in lineage
    extra: dict = field(default_factory=dict)  # e.g. how the set was made
    label: str = "cls"  # where samples keep their class: KEY.cls, or "json:FIELD" of KEY.json

    @cached_property
    def labels(self) -> Labels:
        """The label reader every consumer shares (`data inspect` calls it per sample)."""
        return Labels(self.classes, self.label)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise UserError(
                f"dataset {self.location}: no split {name!r} (it has {sorted(self.splits)}; write one with "
                "python -m data write --val-fraction 0.15 ..., or for shards of another tool move whole "
                f"shards with python -m data index {parent_url(self.location)} --val-fraction 0.1 "
                "--overwrite)"
            )
        return self.splits[name]

    def shard_url(self, shard: Shard) -> str:
        return join_url(parent_url(self.location), shard.url)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "classes": list(self.classes),
            **({"label": self.label} if self.label != "cls" else {}),
            "splits": {
                name: {
                    "num_samples": split.num_samples,
                    "num_bytes": split.num_bytes,
                    "shards": [s.to_json() for s in split.shards],
                }
                for name, split in self.splits.items()
            },
            "num_samples": sum(s.num_samples for s in self.splits.values()),
            **self.extra,
        }


def parent_url(url: str) -> str:
    if "://" in url:
        return url.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(os.path.expanduser(url)))


def join_url(base: str, url: str) -> str:
    if "://" in url or os.path.isabs(url):
        return url
    return posixpath.join(base, url) if "://" in base else os.path.join(base, url)


def index_url(path_or_dir: str) -> str:
    """Accept a data set directory as well as the index file itself."""
    if "://" not in path_or_dir:
        path_or_dir = os.path.abspath(os.path.expanduser(path_or_dir))
    if path_or_dir.endswith(".json"):
        return path_or_dir
    return join_url(path_or_dir.rstrip("/"), INDEX_NAME)


def load_index(path_or_dir: str) -> DatasetIndex:
    url = index_url(str(path_or_dir))
    try:
        with fsspec.open(url, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(
            f"no dataset index at {url} (make shards and an index with: "
            f"python -m data write --from-folder IMAGES {parent_url(url)})"
        ) from None
    except ImportError as e:  # fsspec names the package a URL scheme needs
        raise UserError(f"cannot open {url}: {e}") from None
    except (OSError, ValueError) as e:  # permissions, credentials, unreachable endpoints
        raise UserError(f"cannot read {url}: {e}") from None
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')}, this shardtrain reads {VERSION}")
        splits = {
            name: Split(tuple(shard_from_json(s) for s in split["shards"]))
            for name, split in doc["splits"].items()
        }
        classes = tuple(doc["classes"])
        label = Labels(classes, doc.get("label", "cls")).source
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{url} is not a shardtrain dataset index: {e}") from None
    piped = [s.url for split in splits.values() for s in split.shards if s.url.startswith("pipe:")]
    if piped:
        # webdataset would run the rest of such a URL as a shell command: a data set must never
        # be able to execute anything, so there is no opener for it here.
        raise UserError(
            f"{url} lists shards as pipe: commands ({piped[0]} ...); shardtrain never runs commands "
            "to read data: give the shards as paths or fsspec URLs (s3://, gs://, https://)"
        )
    known = {"format", "version", "classes", "label", "splits", "num_samples"}
    extra = {k: v for k, v in doc.items() if k not in known}
    return DatasetIndex(classes, splits, url, hashlib.sha256(raw).hexdigest(), extra, label)


def shard_from_json(entry: dict) -> Shard:
    sizes = tuple(tuple(int(v) for v in r) for r in entry.get("sizes", ()))
    return Shard(**{**entry, "sizes": sizes})


def save_index(index: DatasetIndex, url: str) -> str:
    """Write the index last, and atomically on local disk, so a half-written data set has none."""
    raw = (json.dumps(index.to_json(), indent=1) + "\n").encode()
    if "://" in url:
        with fsspec.open(url, "wb") as f:
            f.write(raw)
    else:
        tmp = f"{url}.{os.getpid()}.tmp"  # per process: concurrent writers never share it
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, url)
    return hashlib.sha256(raw).hexdigest()
