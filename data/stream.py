"""Planned samples → decoded uint8 batches, as small generator stages inside one loader worker.

    plan.worker_samples()        (shard, sample) in the order this worker yields them
      └─ read_planned           {"__key__", "__url__", "__shard__", "jpg", "cls", ...} raw bytes
         │                      from the tars, each shard opened once per pass: from local disk,
         │                      through the machine's shard cache (data/cache.py), or streamed
         │                      from object storage in ranged GETs (data/remote.py)
         └─ tag_sources         a data.mix: each sample's source, keys NAME:KEY (data/mix.py)
            └─ decode_samples   (uint8 (3, S, S) image, target, key), or None where a sample
               │                cannot train (counted per reason and shard); the target is the
               │                task's (data/targets.py): class index, multi-hot, or mask
               └─ batched       one batch per planned group (data/batching.py): (uint8
                                (b, 3, S, S), targets (int64 (b,), float (b, C), uint8 (b, H, W)
                                or a list of masks of their images' sizes), b keys, bad counts
                                since the last batch), b <= B; stacked into shared memory the
                                worker reuses once the main process lets go (data/batch_pool.py)

Tars are parsed by data/tar.py (webdataset's file grouping, a faster header parser): nothing in a
shard is unpickled or executed.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data import memory, remote
from data import samples as shard_samples
from data.batch_pool import SLOTS, SlotPool
from data.batching import batched
from data.cache import CacheConfig, ShardCache, ShardRef
from data.errors import UserError
from data.index import DatasetIndex
from data.mix import Source, shard_sources, tag_sources
from data.plan import EpochPlan, Sample
from data.samples import BadSample, is_left_out
from data.tile_stream import TileCutter, image_order, tile_items
from data.tiles import Slots

log = logging.getLogger(__name__)


class BadSamples:
    """Counts skipped samples per reason and per shard, and names the first few with shard and
    key. `take()` hands over what was counted since the last call, to ride on the next batch."""

    def __init__(self, show: int = 5):
        self.counts: Counter = Counter()
        self.show = show
        self._reasons: Counter = Counter()
        self._shards: Counter = Counter()

    def __call__(self, reason: str, url: str, key: str, error: Exception | None = None) -> None:
        self.counts[reason] += 1
        self._reasons[reason] += 1
        if is_left_out(reason):  # on purpose, not bad data: no shard to blame, nothing to warn of
            return
        self._shards[url] += 1
        if sum(self._bad_counts()) <= self.show:
            detail = f": {error}" if error else ""
            log.warning("skipped sample %s in %s (%s%s)", key, url, reason, detail)

    def _bad_counts(self):
        return (n for r, n in self.counts.items() if not is_left_out(r))

    def take(self) -> dict:
        out = {"reasons": dict(self._reasons), "shards": dict(self._shards)}
        self._reasons.clear()
        self._shards.clear()
        return out


Opener = Callable[[int, int], AbstractContextManager[BinaryIO]]  # (shard, position) → its bytes


def _tar_samples(
    url: str, opening: Callable[[], AbstractContextManager[BinaryIO]]
) -> Generator[tuple[int, dict]]:
    """(sample number in the shard, sample) in file order; the shard is opened at the first one,
    so a missing shard raises where samples are asked for."""
    with opening() as f:
        yield from enumerate(shard_samples.tar_samples(f, url))


def passes(samples: Sequence[Sample], sizes: Sequence[int] | None) -> list[tuple[int, int]]:
    """(shard, position of its first planned sample) per pass over a shard, in order of first
    need. A shard read again within the epoch (an up-sampled source) is a pass of its own."""
    first: dict[tuple[int, int], int] = {}
    for at, (shard, i) in enumerate(samples):
        first.setdefault((shard, i // sizes[shard] if sizes else 0), at)
    return [(shard, at) for (shard, _), at in first.items()]


def read_planned(
    samples: Sequence[Sample],
    urls: Sequence[str],
    bad: BadSamples,
    missing: str = "fail",
    sizes: Sequence[int] | None = None,
    opener: Opener | None = None,
) -> Iterator[dict | None]:
    """Yield the planned samples in plan order, each tagged with its shard (`__shard__`), reading
    every shard front to back once per pass.

    Samples a shard holds before the one asked for are kept only if the plan wants them later
    (the shuffle buffer bounds how many), so memory stays flat and reads stay sequential. A shard
    listed in the index but missing is an error, or with `missing="skip"` its samples are bad.
    `sizes` (samples per shard) tells passes apart: sample i of a shard of n is sample i % n of
    pass i // n (data/plan.py). `opener` opens a shard (default: by its URL, data/remote.py).
    """
    opener = opener or (lambda shard, at: remote.open_shard(urls[shard]))
    wanted = set(samples)
    # Per pass: planned samples not yet read from the file. At 0 the file is closed (and a cached
    # shard unpinned), though the shuffle buffer may yield the last of them much later.
    unread = Counter((s, i // sizes[s] if sizes else 0) for s, i in samples)
    readers: dict[tuple[int, int], Generator[tuple[int, dict]]] = {}
    stash: dict[Sample, dict] = {}
    ended: dict[tuple[int, int], str] = {}  # passes that stopped early, and why: the rest is lost
    for at, (shard, i) in enumerate(samples):
        run = (shard, i // sizes[shard] if sizes else 0)
        offset = run[1] * sizes[shard] if sizes else 0
        while (shard, i) not in stash and run not in ended:
            reader = readers.get(run)
            if reader is None:
                reader = readers[run] = _tar_samples(urls[shard], lambda s=shard, a=at: opener(s, a))
            try:
                j, sample = next(reader)
            except FileNotFoundError:
                readers.pop(run)
                if missing != "skip":
                    raise UserError(
                        f"shard {urls[shard]} is listed in the index but missing (restore it, "
                        "or rewrite the data set; data.missing_shards=skip trains without it)"
                    ) from None
                ended[run] = "missing shard"
                log.warning("shard %s is listed in the index but missing: skipping it", urls[shard])
                break
            except StopIteration:
                readers.pop(run)
                ended[run] = "shard shorter than its index"
                break
            except UserError:
                raise
            except Exception as e:  # truncated or corrupt tar, or storage that stopped answering
                readers.pop(run).close()
                ended[run] = "unreadable tar"
                log.warning("shard %s stops early: %s", urls[shard], e)
                break
            if (shard, j + offset) in wanted:
                sample["__shard__"] = shard
                stash[(shard, j + offset)] = sample
                unread[run] -= 1
                if unread[run] == 0:
                    readers.pop(run).close()
        if (shard, i) in stash:
            yield stash.pop((shard, i))
        else:
            bad(ended[run], urls[shard], f"#{i % sizes[shard] if sizes else i}")
            yield None  # the plan position stays taken: batches follow plan positions


def decode_samples(
    samples: Iterable[dict | None],
    transform: Callable,
    targets: Callable[[dict], object],
    bad: BadSamples,
) -> Iterator[tuple[torch.Tensor, object, str] | None]:
    """(image, target, key) per planned sample, or None where it cannot train. A spatial target
    (a mask) goes through the transform with its image, so both get the same crop and flip."""
    for sample in samples:
        if sample is None:  # lost upstream, already counted
            yield None
            continue
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            data = shard_samples.image_bytes(sample)
            if getattr(targets, "spatial", False):
                image, target = transform(data, targets(sample))
            else:  # the image first: a corrupt image counts as one, whatever its label
                image = transform(data)
                target = targets(sample)
        except BadSample as e:
            bad(str(e), url, key)
            image = None
        except Exception as e:  # PIL raises many types for corrupt data
            bad("undecodable image", url, key, e)
            image = None
        yield None if image is None else (image, target, key)


@dataclass(frozen=True)
class ShardSet:
    """A split's shards as the stream reads them, in index order."""

    refs: tuple[ShardRef, ...]  # URL, bytes and sha256 of each shard
    sizes: tuple[int, ...]  # samples (images) each shard holds
    sources: tuple[int, ...] = ()  # a mixed run (data.mix): each shard's source number ...
    names: tuple[str, ...] = ()  # ... and each source's name

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.refs]

    @classmethod
    def of(cls, index: DatasetIndex, split: str, sources: Sequence[Source] = ()) -> ShardSet:
        shards = index.split(split).shards
        refs = tuple(ShardRef.of(index, s) for s in shards)
        tagged = tuple(shard_sources(sources, split)) if sources else ()
        return cls(refs, tuple(s.num_samples for s in shards), tagged, tuple(s.name for s in sources))


class ShardStream(IterableDataset):
    """One rank's batches for one epoch, following `plan`; each loader worker reads its share.

    The owner sets `plan` (rank, layout, ...) before workers start, and `position` (epoch,
    batches already trained on) before each pass: a tensor in shared memory, so workers that
    persist across epochs read each epoch's value from it. With `cache`, shards on object storage
    are read through the machine's shard cache (data/cache.py), which each worker tells what it
    will read: the rest of this pass, then the next epoch's.
    """

    def __init__(
        self,
        shards: ShardSet,
        plan: EpochPlan,
        transform: Callable,
        targets: Callable,  # sample → the task's target (data/targets.py)
        missing: str = "fail",  # a shard listed but not found: "fail", or "skip" its samples
        tiles: tuple[Slots, TileCutter] | None = None,  # plan slots are tiles (data/tiles.py)
        cache: CacheConfig | None = None,
        batch_slots: int = SLOTS,  # batches a worker builds in reused memory (0: fresh each time)
    ):
        self.shards, self.plan, self.transform, self.targets = shards, plan, transform, targets
        self.missing, self.tiles, self.cache, self.batch_slots = missing, tiles, cache, batch_slots
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, consumed batches)
        self.pool_id = uuid.uuid4().hex  # names this stream's batch slots (data/batch_pool.py)
        self._client: ShardCache | None = None  # made in the worker process, kept across passes
        self._slots: SlotPool | None = None  # likewise: the worker's reused batch memory

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], dict]]:
        info = get_worker_info()
        epoch, consumed = self.position.tolist()
        # The DataLoader always asks its worker 0 first; after `consumed` batches the plan's
        # round-robin is at worker consumed % W, so loader worker i plays plan worker i + that.
        workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + consumed) % workers
        if info is not None:
            memory.bounded_in_worker()  # a worker streams images, not a model's activations
            # Augmentations draw from the worker's torch RNG: seed it from the plan, not from the
            # main process's RNG (whose state depends on what ran before, e.g. a launcher), so the
            # same config crops the same way under any launcher, and again on a rerun.
            key = [self.plan.seed, epoch, self.plan.rank, worker, consumed]
            torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        bad = BadSamples()
        samples = replace(self.plan, epoch=epoch).worker_samples(worker, consumed)
        reads = image_order(samples, self.tiles[0]) if self.tiles else samples  # tiles: each image once
        sizes, urls = self.shards.sizes, self.shards.urls
        # next epoch, nothing consumed yet: loader worker i plays plan worker i
        nxt = replace(self.plan, epoch=epoch + 1, before=())
        opener = self._opener(reads, lambda: nxt.worker_samples(info.id if info else 0))
        read = read_planned(reads, urls, bad, self.missing, sizes, opener)
        if self.shards.sources:  # a mixed run: each sample's source, and keys NAME:KEY
            read = tag_sources(read, self.shards.sources, self.shards.names)
        if self.tiles:
            slots, cut = self.tiles
            items = tile_items(samples, slots, read, cut, epoch, bad)
        else:
            items = decode_samples(read, self.transform, self.targets, bad)
        if info is not None and self._slots is None and self.batch_slots:
            self._slots = SlotPool(self.pool_id, self.batch_slots)
        yield from batched(items, self.plan.batch_size, bad, self._slots)

    def _opener(self, reads: Sequence[Sample], after: Callable[[], list[Sample]]) -> Opener:
        """How this worker opens its shards: through the cache where they are remote (telling it
        this pass's reads, then the next epoch's, `after`), else straight from where they are."""
        refs, sizes = self.shards.refs, self.shards.sizes
        if not self.cache or not any(remote.is_remote(r.url) for r in refs):
            return lambda shard, at: remote.open_shard(refs[shard].url, refs[shard].num_bytes)
        if self._client is None:
            self._client = ShardCache(self.cache)
        nxt = image_order(after(), self.tiles[0]) if self.tiles else after()
        plan = passes(reads, sizes) + [(s, len(reads) + at) for s, at in passes(nxt, sizes)]
        self._client.follow([(refs[s], at) for s, at in plan if remote.is_remote(refs[s].url)])
        client = self._client

        def opener(shard: int, at: int) -> AbstractContextManager[BinaryIO]:
            ref = refs[shard]
            return client.open(ref, at) if remote.is_remote(ref.url) else remote.open_shard(ref.url)

        return opener
