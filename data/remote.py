"""Reading shards from object storage: one client per process, ranged GETs retried with backoff,
and large shards fetched as several ranges at once.

    url ──filesystem()──▶ the process's one client (s3fs, gcsfs, ...), made once after fork:
                          credentials are resolved once, not per shard
        ──get_range()───▶ bytes [start, end): a throttled (S3's 503 SlowDown), timed-out or cut
                          request is retried up to ATTEMPTS times, the wait doubling from 0.2 s,
                          each retry logged with the shard and the attempt
        ──download()────▶ a whole shard into a local file, CHUNK-sized ranges PARALLEL at a time
        ──RangedReader──▶ a shard streamed front to back, the next ranges fetched while the
                          current one is parsed (training without a cache)

Sizes come from the index (each shard's num_bytes), so reading a shard costs no HEAD request.
The client's own retries are turned off where we can (S3), so each retry is ours and is logged.
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import fsspec

log = logging.getLogger(__name__)

CHUNK = 8 << 20  # bytes per ranged GET
PARALLEL = 4  # ranged GETs in flight per shard
ATTEMPTS = 6  # per range, the first included
BACKOFF_S = 0.2  # the first retry's wait; doubled per attempt, at most MAX_BACKOFF_S, with jitter
MAX_BACKOFF_S = 5.0
# The client's own retry loops (botocore's, then s3fs's `retries` attribute) would hide
# throttling from the log and multiply our attempts: ours are the only ones.
CLIENT_OPTIONS = {"s3": {"config_kwargs": {"retries": {"total_max_attempts": 1}}}}  # botocore: no retry
CLIENT_ATTRIBUTES = {"s3": {"retries": 1}}

_clients: dict[tuple, fsspec.AbstractFileSystem] = {}
_pools: dict[int, ThreadPoolExecutor] = {}
_guard = threading.Lock()


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(this process's client for the URL's scheme, the path it takes)."""
    protocol = url.split("://", 1)[0]
    # A loader worker forked from a process with a client makes its own; a process that points
    # AWS_ENDPOINT_URL elsewhere (tests do) gets a client for the new endpoint.
    key = (os.getpid(), protocol, os.environ.get("AWS_ENDPOINT_URL"))
    with _guard:
        fs = _clients.get(key)
        if fs is None:
            options = {**CLIENT_OPTIONS.get(protocol, {}), "skip_instance_cache": True}
            fs = _clients[key] = fsspec.filesystem(protocol, **options)
            for name, value in CLIENT_ATTRIBUTES.get(protocol, {}).items():
                setattr(fs, name, value)
    return fs, fs._strip_protocol(url)


def _pool() -> ThreadPoolExecutor:
    with _guard:
        pool = _pools.get(os.getpid())
        if pool is None:
            # Room for a reader's streams and several fetches at once: a reader's urgent ranges
            # wait behind no more than a few prefetched ones.
            pool = _pools[os.getpid()] = ThreadPoolExecutor(PARALLEL * 4, thread_name_prefix="ranged-get")
    return pool


# Not worth another try: a missing object, refused credentials, and our own mistakes. Everything
# else is (throttling, timeouts, resets, 5xx, a body cut short: aiohttp's ClientPayloadError and
# http.client's IncompleteRead are no OSErrors, and the client's own retries are off).
FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TypeError, AttributeError)


def retryable(error: BaseException) -> bool:
    return isinstance(error, Exception) and not isinstance(error, FINAL)


def get_range(url: str, start: int, end: int, attempts: int = ATTEMPTS) -> bytes:
    """Bytes [start, end) of the object at `url`."""
    fs, path = filesystem(url)
    for attempt in range(1, attempts + 1):
        try:
            data = fs.cat_file(path, start=start, end=end)
            if len(data) > end - start and len(data) >= end:  # a server that ignores Range: the whole body
                data = data[start:end]
            if len(data) != end - start:
                raise OSError(f"short read: {len(data)} of {end - start} bytes (has the shard changed?)")
            return data
        except Exception as e:
            if attempt == attempts or not retryable(e):
                raise
            wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "%s bytes %d-%d: %s (attempt %d of %d); retrying in %.2f s",
                url,
                start,
                end,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
                attempt,
                attempts,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def ranges(size: int) -> list[tuple[int, int]]:
    return [(a, min(size, a + CHUNK)) for a in range(0, size, CHUNK)] or [(0, 0)]


def download(url: str, size: int, fd: int) -> None:
    """The whole object (`size` bytes, from the index) into the open file `fd`, PARALLEL ranges
    in flight (so a retried range holds back at most that many in memory)."""
    todo = deque(r for r in ranges(size) if r[1] > r[0])
    flight: deque[tuple[int, Future]] = deque()
    try:
        while todo or flight:
            while todo and len(flight) < PARALLEL:
                a, b = todo.popleft()
                flight.append((a, _pool().submit(get_range, url, a, b)))
            a, future = flight.popleft()
            os.pwrite(fd, future.result(), a)
    finally:
        for _, future in flight:
            future.cancel()


class RangedReader(io.RawIOBase):
    """A shard read front to back in CHUNK ranges, up to PARALLEL of them fetched ahead."""

    def __init__(self, url: str, size: int):
        self.url, self.size = url, size
        self._todo = deque(r for r in ranges(size) if r[1] > r[0])
        self._ahead: deque[Future] = deque()
        self._buf, self._pos = b"", 0
        self._fill()

    def _fill(self) -> None:
        while self._todo and len(self._ahead) < PARALLEL:
            a, b = self._todo.popleft()
            self._ahead.append(_pool().submit(get_range, self.url, a, b))

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        while self._pos >= len(self._buf):
            if not self._ahead:
                return 0
            self._buf, self._pos = self._ahead.popleft().result(), 0
            self._fill()
        n = min(len(out), len(self._buf) - self._pos)
        out[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()
        super().close()


def open_remote(url: str, size: int | None) -> io.BufferedReader:
    """A shard on object storage as a buffered stream (`size` None: asked of the store)."""
    if not size:
        fs, path = filesystem(url)
        size = fs.size(path)
    return io.BufferedReader(RangedReader(url, size), buffer_size=1 << 20)


def open_shard(url: str, size: int | None = None) -> BinaryIO:
    """A shard's bytes, front to back: a local file, or ranged GETs of one on object storage."""
    if is_remote(url):
        return open_remote(url, size)
    return open(url.removeprefix("file://"), "rb")
