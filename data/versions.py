"""A data set that grows: each write (the first, then every `--append`) is a version of it.

dataset.json keeps the list, oldest first, in `versions`:

    {"version": 2, "shards": {"train": ["train-000012.tar", ...], "val": [...]},
     "samples": 1200, "duplicates": 37, "keys": [10000, 11237],
     "images": "images-v000002.sha256", "images_sha256": "...", "sha256": "...",
     "created_by": {"folder": "day2/"}}

`shards` are those the version added (the shards before it stay as they were, byte for byte);
`keys` the sample keys it numbered (appended items continue the numbering, so keys stay unique);
`images` a file of the sha256 of every image it wrote (32 raw bytes each, in index order), which
the next append checks new images against; `sha256` names the whole data set as of that version
(every shard's url and sha256), for lineage. `data.version=N` trains on the shards of versions 1..N.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import fsspec
import numpy as np

from data.errors import UserError
from data.index import DatasetIndex, Split, join_url, parent_url

DIGEST = 32  # bytes of one sha256


def images_name(version: int) -> str:
    return f"images-v{version:06d}.sha256"


def content_sha256(splits: dict[str, Split]) -> str:
    """The data set as its shards: every split's shard urls and sha256s, in order."""
    listing = {name: [[s.url, s.sha256] for s in split.shards] for name, split in sorted(splits.items())}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def versions(index: DatasetIndex) -> list[dict]:
    return list(index.extra.get("versions", ()))


def next_key(index: DatasetIndex) -> int:
    """The first sample key a new version may use: past every key of the data set so far."""
    known = versions(index)
    if known:
        return int(known[-1]["keys"][1])
    # A data set without versions (written before them, or indexed from another tool's shards):
    # our writer numbers keys 0..n-1; past the sample count is safe either way for ours.
    return sum(s.num_samples for s in index.splits.values())


def at_version(index: DatasetIndex, version: int | None) -> DatasetIndex:
    """The data set as it was at `version` (None: as it is now)."""
    known = versions(index)
    if version is None:
        return index
    if not known:
        raise UserError(
            f"data.version={version}: {index.location} has no versions (it was written before they "
            "were recorded, or indexed from another tool's shards); drop data.version"
        )
    numbers = [v["version"] for v in known]
    if version not in numbers:
        raise UserError(f"data.version={version}: {index.location} has versions {numbers}")
    kept = {url for v in known if v["version"] <= version for urls in v["shards"].values() for url in urls}
    splits = {
        name: Split(tuple(s for s in split.shards if s.url in kept)) for name, split in index.splits.items()
    }
    return replace(index, splits={k: v for k, v in splits.items() if v.shards})


def current(index: DatasetIndex) -> tuple[int | None, str]:
    """(the version `index` holds, the sha256 naming its content): what lineage records, and what
    a mid-epoch resume checks, so an append while a pinned run trains does not stop its resume."""
    known = versions(index)
    if not known:
        return None, index.sha256
    version = max((v for v in known if all_in(v, index)), key=lambda v: v["version"], default=None)
    if version is None:
        return None, index.sha256
    return version["version"], version["sha256"]


def all_in(version: dict, index: DatasetIndex) -> bool:
    urls = {s.url for split in index.splits.values() for s in split.shards}
    return all(u in urls for shards in version["shards"].values() for u in shards)


def known_images(index: DatasetIndex) -> np.ndarray:
    """(n, 32) uint8: the sha256 of every image the data set holds, from its versions' files;
    a data set without them (older, or another tool's) is read once to work them out."""
    known = versions(index)
    base = parent_url(index.location)
    if known:
        parts = []
        for v in known:
            url = join_url(base, v["images"])
            try:
                with fsspec.open(url, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                raise UserError(
                    f"{url} is missing: it lists version {v['version']}'s images, which --append checks "
                    "new images against; restore it, or rewrite the data set"
                ) from None
            if hashlib.sha256(raw).hexdigest() != v["images_sha256"]:
                raise UserError(
                    f"{url} differs from its sha256 in the index: restore it, or rewrite the data set"
                )
            parts.append(np.frombuffer(raw, np.uint8).reshape(-1, DIGEST))
        return np.concatenate(parts) if parts else np.zeros((0, DIGEST), np.uint8)
    return scan_images(index)


def scan_images(index: DatasetIndex) -> np.ndarray:
    from data.samples import BadSample, image_bytes, read_shard

    digests = []
    for split in index.splits.values():
        for shard in split.shards:
            for sample in read_shard(index.shard_url(shard)):
                try:
                    digests.append(hashlib.sha256(image_bytes(sample)).digest())
                except BadSample:
                    continue
    return np.frombuffer(b"".join(digests), np.uint8).reshape(-1, DIGEST)


class Seen:
    """Membership of 32-byte digests in a large set, in about 8 bytes per known image: a sorted
    array of each digest's first 8 bytes, every hit confirmed on the whole digest."""

    def __init__(self, digests: np.ndarray):
        order = np.argsort(_prefix(digests), kind="stable")
        self.digests = digests[order]
        self.prefix = _prefix(self.digests)

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, digest: bytes) -> bool:
        if not len(self.prefix):
            return False
        key = np.frombuffer(digest[:8], "<u8")[0]
        lo, hi = np.searchsorted(self.prefix, key, "left"), np.searchsorted(self.prefix, key, "right")
        return any(self.digests[i].tobytes() == digest for i in range(lo, hi))


def _prefix(digests: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(digests[:, :8]).view("<u8").ravel()
