"""One shard cache per machine for data on object storage, fetched ahead along the epoch plan
and evicted by it, under a hard byte budget shared by every loader worker of every rank.

    ShardStream (a loader worker) ──follow(its passes: this epoch's, then the next's)──▶ ShardCache
    ShardCache.open(shard) ── pin ─▶ in shards/? ─▶ read it
                                   └▶ reserve room (data/cache_dir.py evicts by the plan) ─▶ fetch
                                      (parallel ranged GETs, data/remote.py) ─▶ read it
                                   └▶ no room: stream it from storage, uncached
    a prefetch thread per reader ──▶ the next `prefetch` shards of its plan, as room allows

Everything the readers of a machine share (the directory, its budget and the eviction rule) is in
data/cache_dir.py; this is one reader's side.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from typing import BinaryIO

from data import remote
from data.cache_dir import HOST, CacheDir, owner
from data.errors import UserError
from data.index import DatasetIndex, Shard

log = logging.getLogger(__name__)

_readers = count()


@dataclass(frozen=True)
class CacheConfig:
    directory: str
    limit: int  # bytes on disk, all shards of all readers of this machine together
    prefetch: int = 2  # shards fetched ahead of each loader worker
    verify: bool = False  # check a cached shard's sha256 (once per process) besides its size
    policy: str = "plan"  # "plan": furthest next use first; "lru": least recently opened first

    @classmethod
    def of(cls, directory: str | None, limit: int | str | None, *rest) -> CacheConfig | None:
        """From data.cache_dir, cache_limit (train/settings.py: both or neither), prefetch, ..."""
        if not directory:
            return None
        if limit is None:  # train/settings.py names it; here for a caller that skipped the check
            raise UserError("data.cache_dir needs data.cache_limit, the cache's budget on disk (e.g. 20GB)")
        return cls(os.path.abspath(os.path.expanduser(directory)), parse_bytes(limit), *rest)


@dataclass(frozen=True)
class ShardRef:
    url: str
    num_bytes: int
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.sha256 or hashlib.sha256(self.url.encode()).hexdigest()

    @classmethod
    def of(cls, index: DatasetIndex, shard: Shard) -> ShardRef:
        return cls(index.shard_url(shard), shard.num_bytes, shard.sha256)


def parse_bytes(value: int | str) -> int:
    """20GB, 512MiB, 1.5e9 or a plain integer → bytes (KB/MB/GB/TB are powers of 1000, KiB...
    of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10}
    units |= {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(float(text))


def check_cache(config: CacheConfig, index: DatasetIndex) -> None:
    """Before training: the directory can be written, and the budget holds two of the largest
    remote shard (one being read while the next arrives). Local shards are read where they are."""
    shards = [ShardRef.of(index, s) for split in index.splits.values() for s in split.shards]
    shards = [s for s in shards if remote.is_remote(s.url)]
    if not shards:
        log.info("data.cache_dir is set, but the shards are on local disk: they are read where they are")
        return
    largest = max(s.num_bytes for s in shards)
    if config.limit < 2 * largest:
        raise UserError(
            f"data.cache_limit={config.limit} bytes is below twice the largest shard ({largest} bytes): "
            f"set at least data.cache_limit={2 * largest}, or write smaller shards"
        )
    try:
        for sub in ("shards", "partial", "readers"):
            os.makedirs(os.path.join(config.directory, sub), exist_ok=True)
        probe = os.path.join(config.directory, "partial", f".probe-{HOST}-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        raise UserError(
            f"data.cache_dir={config.directory} cannot be written ({e.strerror or e}): give a local "
            "directory this user can write, or leave data.cache_dir unset to stream without a cache"
        ) from None


class ShardCache:
    """One loader worker's (or a main process's) view of the machine's cache."""

    def __init__(self, config: CacheConfig):
        self.config = config
        self.store = CacheDir(config.directory, config.limit, config.policy)
        self.id = f"{owner()}-{next(_readers)}"
        self._state = {"at": 0, "reading": [], "next": {}}
        self._plan: list[tuple[ShardRef, int]] = []  # (shard, position it is first needed at)
        self._verified: set[str] = set()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._failed: set[str] = set()  # shards whose prefetch failed in this plan
        self._stop = False

    # -- the reader's side -------------------------------------------------------------------

    def follow(self, plan: Sequence[tuple[ShardRef, int]]) -> None:
        """The worker's reads from now on: each shard pass with the position it starts at, in
        order (this pass, then the next epoch's). Prefetching follows it."""
        with self._wake:
            self._plan = list(plan)
            self._failed = set()
            self._state["at"] = 0
            self._state["next"] = _next_uses(self._plan, 0)
            self._wake.notify_all()
        with self.store.locked():
            self.store.publish(self.id, self._state)
        if self.config.prefetch and self._thread is None:
            self._thread = threading.Thread(target=self._prefetch, name="shard-prefetch", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def open(self, ref: ShardRef, at: int) -> Iterator[BinaryIO]:
        """The shard, from the cache (fetched now if it is not there) or, when the budget has no
        room for it, straight from storage. `at`: the reader's position, for the others' choices."""
        with self._wake:
            self._state["at"] = at
            self._state["next"] = _next_uses(self._plan, at)
            self._wake.notify_all()
        try:
            path = self._pinned(ref)
            if path is None:
                log.debug("cache full of shards needed sooner: streaming %s", ref.url)
                with remote.open_remote(ref.url, ref.num_bytes) as f:
                    yield f
            else:
                with open(path, "rb") as f:
                    yield f
        finally:
            with self.store.locked():  # one pin of it: two passes over one shard may be open at once
                if ref.name in self._state["reading"]:
                    self._state["reading"].remove(ref.name)
                self.store.publish(self.id, self._state)

    def close(self) -> None:
        self._stop = True
        with self._wake:
            self._wake.notify_all()
        self.store.forget(self.id)

    def _pinned(self, ref: ShardRef) -> str | None:
        """The complete shard's path, fetched first if needed; None when the budget has no room
        for it. Pinned from the start, so no one evicts it between its arrival and our read."""
        with self.store.locked():
            self._state["reading"].append(ref.name)
            self.store.publish(self.id, self._state)
        while True:
            reserved = None
            with self.store.locked():
                path = self.store.complete(ref.name, ref.num_bytes, ref.url)
                if path:
                    os.utime(path)  # when last opened: what the LRU baseline evicts by
                elif not self.store.fetching(ref.name):
                    reserved = self._reserve(ref, 0)
                    if reserved is None:
                        return None
            if path:  # pinned: hashed, if asked, outside the lock, as no one evicts it meanwhile
                if self._checked(ref, path):
                    return path
            elif reserved:
                self._fetch(ref, reserved)  # checks the sha256 on request before it is complete
            else:
                time.sleep(0.02)  # another reader (or our own prefetch) is fetching it

    def _checked(self, ref: ShardRef, path: str) -> bool:
        """With `verify`, a cached copy whose sha256 is not the index's is removed (it is fetched
        again); each copy is hashed once per process."""
        if not self.config.verify or not ref.sha256 or ref.name in self._verified:
            return True
        if _sha256(path) != ref.sha256:
            log.warning(
                "cached copy of %s is not the shard the index names (sha256): fetching it again", ref.url
            )
            with self.store.locked(), contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return False
        self._verified.add(ref.name)
        return True

    # -- fetching ahead ----------------------------------------------------------------------

    def _prefetch(self) -> None:
        """Keep the next `prefetch` shards of the plan fetched, as the budget allows. It only
        ever runs ahead of the reader: if it stops, the reader fetches what it needs itself."""
        try:
            self._prefetch_loop()
        except Exception as e:  # e.g. the cache directory removed under a running worker
            log.warning("shard prefetch stopped: %s (shards are fetched as they are read)", e)

    def _prefetch_loop(self) -> None:
        # The window's shards are fetched at once, not one after another: each fetch waits a
        # round trip or more, and a worker may read a shard faster than that. Their own threads:
        # a fetch waits on ranged GETs of data/remote.py's pool, which it must not occupy.
        pool = ThreadPoolExecutor(self.config.prefetch, thread_name_prefix="shard-fetch")
        running: dict[str, Future] = {}
        while not self._stop:
            with self._wake:
                at = self._state["at"]
                ahead = _upcoming(self._plan, at, self.config.prefetch)
            running = {n: f for n, f in running.items() if not f.done()}
            for ref, when in ahead:
                if ref.name in running or ref.name in self._failed or len(running) >= self.config.prefetch:
                    continue
                with self.store.locked():
                    if self.store.complete(ref.name, ref.num_bytes, ref.url) or self.store.fetching(ref.name):
                        continue
                    reserved = self._reserve(ref, when - at)
                if reserved is None:
                    break  # no room yet for what comes next: wait for readers to move on
                try:
                    running[ref.name] = pool.submit(self._fetch_ahead, ref, reserved)
                except RuntimeError:  # the process is exiting: its threads take no more work
                    return
            with self._wake:
                if self._state["at"] == at and not self._stop:
                    self._wake.wait(0.05 if running else 0.2)

    def _fetch_ahead(self, ref: ShardRef, reserved: str) -> None:
        try:
            self._fetch(ref, reserved)
        except RuntimeError:  # the process is exiting
            pass
        except Exception as e:  # the reader fetches it again, and reports what fails
            log.warning("prefetch of %s failed: %s", ref.url, e)
            self._failed.add(ref.name)
        with self._wake:
            self._wake.notify_all()

    def _reserve(self, ref: ShardRef, distance: int) -> str | None:
        with self._wake:  # the reader replaces "at" and "next" under _wake, "reading" under the lock
            me = {
                "at": self._state["at"],
                "next": self._state["next"],
                "reading": list(self._state["reading"]),
            }
        return self.store.reserve(ref.name, ref.num_bytes, distance, (self.id, me))

    def _fetch(self, ref: ShardRef, partial: str) -> None:
        """Download into the reserved partial file, check it, and rename it into place."""
        try:
            fd = os.open(partial, os.O_WRONLY)
            try:
                remote.download(ref.url, ref.num_bytes, fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            if os.path.getsize(partial) != ref.num_bytes:
                raise OSError(f"{os.path.getsize(partial)} bytes arrived, the index says {ref.num_bytes}")
            if self.config.verify and ref.sha256:
                if _sha256(partial) != ref.sha256:
                    raise OSError(
                        "its sha256 differs from the index's (has the shard changed? python -m data verify)"
                    )
                self._verified.add(ref.name)
            # atime: when it was last fetched or opened (LRU's order); mtime 0: not opened yet, so
            # kept until a reader has (see _victims)
            os.utime(partial, (time.time(), 0))
            # Under the lock: a reader asks "complete?" then "being fetched?" in one hold of it,
            # and a rename between the two answers "no" twice: it would fetch the shard again.
            with self.store.locked():
                os.replace(partial, self.store.shard_path(ref.name))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)


def _next_uses(plan: Sequence[tuple[ShardRef, int]], at: int) -> dict[str, int]:
    """Each shard's next position at or after `at` (a pass already begun counts as now)."""
    out: dict[str, int] = {}
    for k, (ref, start) in enumerate(plan):
        end = plan[k + 1][1] if k + 1 < len(plan) else start
        if end >= at or start >= at:
            out.setdefault(ref.name, max(start, at))
    return out


def _upcoming(plan: Sequence[tuple[ShardRef, int]], at: int, n: int) -> list[tuple[ShardRef, int]]:
    """The next `n` distinct shards from `at` on (the one being read included)."""
    out, seen = [], set()
    for k, (ref, start) in enumerate(plan):
        end = plan[k + 1][1] if k + 1 < len(plan) else start
        if (end > at or start >= at) and ref.name not in seen:
            seen.add(ref.name)
            out.append((ref, max(start, at)))
            if len(out) > n:
                break
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
