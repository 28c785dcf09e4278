"""(group, key, image, label, json) samples → plain tar shards, byte for byte the same every run.

Tar headers carry no time or owner, entries keep a fixed order (`KEY.<ext>`, `KEY.cls`,
`KEY.json`, `KEY.mask.png`), and a shard's sha256 and size are taken as it is written, so no shard
is read twice. Shard bytes never depend on a shard's file name: the Ray writer writes parts under
staging names and renames them, and still matches the local writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator

from data.decode import open_image
from data.index import Shard
from data.sources import Payload
from data.tiles import run_lengths

TAR_TRAILER = 2 * 512 + tarfile.RECORDSIZE  # end-of-archive blocks plus worst-case record padding


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
    samples: Iterable[tuple[int, str, Payload, int, dict, bytes]],
    out_dir: str,
    name_of: Callable[[int], str],
    shard_samples: int,
    shard_bytes: int,
) -> Iterator[tuple[Shard, list[bytes]]]:
    """(group, key, payload, class index, json, image sha256) → (shard, its images' sha256s), shards
    named `name_of(n)` of at most `shard_samples` samples and about `shard_bytes` bytes (a shard
    closes before the sample that would overflow it) that never span two groups: a group is the
    unit a Ray task writes, so the local and the Ray writer cut the same shards."""
    tar = f = w = None
    count = size = number = 0
    group = None
    sizes: list[tuple[int, int]] = []  # the open shard's image sizes, in sample order
    digests: list[bytes] = []

    def close() -> tuple[Shard, list[bytes]]:
        tar.close()
        f.close()
        return Shard(name, count, w.n, w.sha.hexdigest(), tuple(map(tuple, run_lengths(sizes)))), digests

    for g, key, payload, label, meta, digest in samples:
        entries = [(f"{key}.{payload.ext}", payload.data), (f"{key}.cls", str(label).encode())]
        if meta:
            entries.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
        if payload.mask is not None:
            entries.append((f"{key}.mask.png", payload.mask))
        sample_bytes = sum(512 + len(d) + 511 for _, d in entries)  # header + padded body
        if tar and (g != group or count >= shard_samples or size + sample_bytes > shard_bytes):
            yield close()
            tar = None
        if tar is None:
            name = name_of(number)
            number += 1
            f = open(os.path.join(out_dir, name), "wb")  # noqa: SIM115 (closed by close())
            w = _HashingWriter(f)
            tar = tarfile.open(fileobj=w, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            count, size, sizes, digests, group = 0, TAR_TRAILER, [], [], g
        sizes.append(payload.size or open_image(payload.data).size)  # checked payloads carry it
        digests.append(digest)
        for entry_name, data in entries:
            _add(tar, entry_name, data)
        count += 1
        size += sample_bytes
    if tar:
        yield close()
