"""Planned samples → decoded uint8 batches, as small generator stages inside one loader worker.

    plan.worker_samples()        (shard, sample) in the order this worker yields them
      └─ read_planned           {"__key__", "__url__", "jpg", "cls", ...} raw bytes from the tars
         └─ decode_samples      (uint8 (3, S, S) image, target, key), or None where a sample
            │                   cannot train (counted per reason and shard); the target is the
            │                   task's (data/targets.py): class index, multi-hot, or mask
            └─ batched          one batch per planned group: (uint8 (b, 3, S, S), targets
                                (int64 (b,), float (b, C), uint8 (b, H, W) or a list of masks
                                of their images' sizes), b keys, bad counts since the last
                                batch), b <= B

Tars are opened through fsspec, so local paths and s3:// / gs:// / https:// read alike, and parsed
by data/tar.py (webdataset's file grouping, a faster header parser): nothing in a shard is
unpickled or executed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data import samples as shard_samples
from data.errors import UserError
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


def _tar_samples(url: str) -> Generator[tuple[int, dict]]:
    """(sample number in the shard, sample) in file order."""
    yield from enumerate(shard_samples.read_shard(url))


def read_planned(
    samples: Sequence[Sample], urls: Sequence[str], bad: BadSamples, missing: str = "fail"
) -> Iterator[dict | None]:
    """Yield the planned samples in plan order, reading every shard front to back once.

    Samples a shard holds before the one asked for are kept only if the plan wants them later
    (the shuffle buffer bounds how many), so memory stays flat and reads stay sequential. A shard
    listed in the index but missing is an error, or with `missing="skip"` its samples are bad.
    """
    wanted = set(samples)
    left = Counter(s for s, _ in samples)  # per shard: planned samples not yet yielded
    readers: dict[int, Generator[tuple[int, dict]]] = {}
    stash: dict[Sample, dict] = {}
    ended: dict[int, str] = {}  # shards that stopped early, and why: the rest of each is lost
    for shard, i in samples:
        while (shard, i) not in stash and shard not in ended:
            reader = readers.setdefault(shard, _tar_samples(urls[shard]))
            try:
                j, sample = next(reader)
            except FileNotFoundError:
                if missing != "skip":
                    raise UserError(
                        f"shard {urls[shard]} is listed in the index but missing (restore it, "
                        "or rewrite the data set; data.missing_shards=skip trains without it)"
                    ) from None
                ended[shard] = "missing shard"
                log.warning("shard %s is listed in the index but missing: skipping it", urls[shard])
                break
            except StopIteration:
                ended[shard] = "shard shorter than its index"
                break
            except Exception as e:  # truncated or corrupt tar
                ended[shard] = "unreadable tar"
                log.warning("shard %s stops early: %s", urls[shard], e)
                break
            if (shard, j) in wanted:
                stash[(shard, j)] = sample
        left[shard] -= 1
        if left[shard] == 0 and shard in readers:
            readers.pop(shard).close()
        if (shard, i) in stash:
            yield stash.pop((shard, i))
        else:
            bad(ended[shard], urls[shard], f"#{i}")
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


def batched(samples: Iterable[tuple | None], size: int, bad: BadSamples) -> Iterator[tuple]:
    """One batch per planned group of `size` plan positions, so every worker (and so every
    rank) yields exactly the planned number of batches whatever was skipped; a DDP rank with a
    batch fewer would hang the others.

    A batch holds its group's good samples: bad ones (None) leave it short. A group with no
    good sample at all is owed, and the next group's samples are split to pay it; if the
    worker's samples run out first, the epoch cannot be planned evenly and this says so.
    Yields (images uint8 (b, 3, S, S), labels (b,), b keys, bad counts since the last batch).
    """
    pending: list[tuple] = []
    last: list[tuple] = []  # the samples of the last batch yielded
    owed = positions = 0
    for item in samples:
        positions += 1
        if item is not None:
            pending.append(item)
        if positions % size == 0:
            owed += 1
            if len(pending) >= owed:
                yield from _split(pending, owed, bad)
                last, pending, owed = pending, [], 0
    if positions % size:  # the last, partial group (evaluation only)
        owed += 1
    if owed and len(pending) >= owed:
        yield from _split(pending, owed, bad)
    elif owed and last and any(is_left_out(r) for r in bad.counts):
        # Defects a task leaves out on purpose (task=anomaly) emptied the worker's last groups:
        # they are paid with the samples of its last batch again, so the batch count still holds.
        yield from _split((pending + last * owed)[: max(owed, len(pending))], owed, bad)
    elif owed and bad.counts and all(is_left_out(r) for r in bad.counts):
        raise UserError(
            f"{owed} planned batch(es) of this loader worker hold defect samples only ({dict(bad.counts)}): "
            "task=anomaly trains on the good samples of the train split, so it needs good samples there "
            "(check the split with python -m data inspect)"
        )
    elif owed:
        raise UserError(
            f"{owed} planned batch(es) of this loader worker lost every sample to bad data "
            f"({dict(bad.counts)}); check the shards with python -m data verify"
        )


def _split(items: list[tuple], parts: int, bad: BadSamples) -> Iterator[tuple]:
    """`items` as `parts` batches of near-equal size, in order."""
    base, extra = divmod(len(items), parts)
    start = 0
    for p in range(parts):
        chunk = items[start : start + base + (p < extra)]
        start += len(chunk)
        images, targets, keys = zip(*chunk)
        yield _images(images), _targets(targets), list(keys), bad.take()


def _images(images: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Stacked (b, 3, H, W); whole parts of several sizes (tiled evaluation) → a list."""
    if all(im.shape == images[0].shape for im in images):
        return _stack(images)
    return list(images)


def _targets(targets: Sequence) -> torch.Tensor | list[torch.Tensor]:
    """Class indices → int64 (b,); multi-hot rows or masks of one shape → stacked; masks of
    several sizes (evaluation keeps each image's own) → a list."""
    first = targets[0]
    if isinstance(first, int):
        return torch.tensor(targets)
    targets = [torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in targets]
    if all(t.shape == targets[0].shape for t in targets):
        return _stack(targets)
    return targets


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(b, ...) of equal tensors. In a loader worker it is built straight in shared memory, as
    torch's default collate does, so handing the batch to the main process costs no second copy."""
    first, out = images[0], None
    if get_worker_info() is not None:
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(images), *first.shape)
    return torch.stack(images, out=out)


class ShardStream(IterableDataset):
    """One rank's batches for one epoch, following `plan`; each loader worker reads its share.

    The owner sets `plan` (rank, layout, ...) before workers start, and `position` (epoch,
    batches already trained on) before each pass: a tensor in shared memory, so workers that
    persist across epochs read each epoch's value from it.
    """

    def __init__(
        self,
        urls: Sequence[str],
        plan: EpochPlan,
        transform: Callable,
        targets: Callable,  # sample → the task's target (data/targets.py)
        missing: str = "fail",  # a shard listed but not found: "fail", or "skip" its samples
        tiles: tuple[Slots, TileCutter] | None = None,  # plan slots are tiles (data/tiles.py)
    ):
        self.urls, self.plan, self.transform, self.targets = list(urls), plan, transform, targets
        self.missing, self.tiles = missing, tiles
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, consumed batches)

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
            # Augmentations draw from the worker's torch RNG: seed it from the plan, not from the
            # main process's RNG (whose state depends on what ran before, e.g. a launcher), so the
            # same config crops the same way under any launcher, and again on a rerun.
            key = [self.plan.seed, epoch, self.plan.rank, worker, consumed]
            torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        bad = BadSamples()
        samples = replace(self.plan, epoch=epoch).worker_samples(worker, consumed)
        if self.tiles:  # slots are tiles: each image read once, all its tiles cut at once
            slots, cut = self.tiles
            read = read_planned(image_order(samples, slots), self.urls, bad, self.missing)
            items = tile_items(samples, slots, read, cut, epoch, bad)
        else:
            read = read_planned(samples, self.urls, bad, self.missing)
            items = decode_samples(read, self.transform, self.targets, bad)
        yield from batched(items, self.plan.batch_size, bad)
