"""Planned groups of samples → batches: one batch per group of `size` plan positions, however many
of its samples were bad, so every worker (and so every rank) yields exactly the planned number.

    (image uint8 (3, S, S), target, key) | None per plan position
      └─ batched   (images uint8 (b, 3, S, S), targets, b keys, bad counts since the last batch)
                   built straight in shared memory inside a loader worker
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data.batch_pool import InlineTensor, PooledTensor, SlotPool, inline_if_small
from data.errors import UserError
from data.samples import is_left_out

Batch = torch.Tensor | PooledTensor | InlineTensor | list[torch.Tensor]


def batched(samples: Iterable[tuple | None], size: int, bad, pool: SlotPool | None = None) -> Iterator[tuple]:
    """One batch per planned group of `size` plan positions, so every worker (and so every
    rank) yields exactly the planned number of batches whatever was skipped; a DDP rank with a
    batch fewer would hang the others.

    A batch holds its group's good samples: bad ones (None) leave it short. A group with no
    good sample at all is owed, and the next group's samples are split to pay it; if the
    worker's samples run out first, the epoch cannot be planned evenly and this says so.
    Yields (images uint8 (b, 3, S, S), labels (b,), b keys, bad counts since the last batch);
    in a loader worker with a `pool`, large tensors are stacked into its reused slots.
    """
    pending = _Pending(pool, size)
    last: list[tuple] = []  # the samples of the last batch yielded
    owed = positions = 0
    for item in samples:
        positions += 1
        if item is not None:
            pending.append(item)
        if positions % size == 0:
            owed += 1
            if len(pending) >= owed:
                yield from pending.batches(owed, bad)
                last, pending, owed = pending.items, _Pending(pool, size), 0
    if positions % size:  # the last, partial group (evaluation only)
        owed += 1
    if owed and len(pending) >= owed:
        yield from pending.batches(owed, bad)
    elif owed and last and any(is_left_out(r) for r in bad.counts):
        # Defects a task leaves out on purpose (task=anomaly) emptied the worker's last groups:
        # they are paid with the samples of its last batch again, so the batch count still holds.
        # Its images may be rows of a slot already handed over: copies, before a slot is reused.
        again = [(image.clone(), *rest) for image, *rest in last]
        yield from _split((pending.plain() + again * owed)[: max(owed, len(pending))], owed, bad, pool)
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


class _Pending:
    """The good samples of the groups not yet batched. With a pool, each image is copied into a
    reserved slot row as it arrives, while it is still in the CPU's caches: holding a batch's
    decoded images (38 MB at 256 x 224 px) until a stack reads them back from memory cost about
    30 us per image more (0.57 ms each to decode and transform, small set)."""

    def __init__(self, pool: SlotPool | None, size: int):
        self.pool, self.size = pool, size
        self.items: list[tuple] = []  # (image, target, key); an image in a slot is a view of its row
        self.slot: tuple[int, torch.Tensor] | None = None  # (slot number, its (size, ...) rows)

    def __len__(self) -> int:
        return len(self.items)

    def append(self, item: tuple) -> None:
        image = item[0]
        if self.pool is not None and not self.items and isinstance(image, torch.Tensor):
            self.slot = self.pool.rows(image, self.size)  # None: no slot free, or a small batch
        if self.slot is not None:
            rows, n = self.slot[1], len(self.items)
            if n < len(rows) and image.shape == rows.shape[1:] and image.dtype == rows.dtype:
                item = (rows[n].copy_(image), *item[1:])
            else:  # an image of another size (whole parts), or more than a batch (a group owed)
                self.plain()
        self.items.append(item)

    def plain(self) -> list[tuple]:
        """The samples with images of their own: rows copied out, the slot given back."""
        if self.slot is not None:
            self.items = [(image.clone(), *rest) for image, *rest in self.items]
            self.pool.unreserve(self.slot[0])
            self.slot = None
        return self.items

    def batches(self, parts: int, bad) -> Iterator[tuple]:
        """The samples as `parts` batches of near-equal size, in order (_split); one batch whose
        images fill its slot's first rows goes over as it is."""
        if parts == 1 and self.slot is not None:
            i, rows = self.slot
            _, targets, keys = zip(*self.items)
            images = self.pool.hand(i, rows, len(self.items))
            yield images, _targets(targets, self.pool), list(keys), bad.take()
        else:
            yield from _split(self.plain(), parts, bad, self.pool)


def _split(items: list[tuple], parts: int, bad, pool: SlotPool | None) -> Iterator[tuple]:
    """`items` as `parts` batches of near-equal size, in order."""
    base, extra = divmod(len(items), parts)
    start = 0
    for p in range(parts):
        chunk = items[start : start + base + (p < extra)]
        start += len(chunk)
        images, targets, keys = zip(*chunk)
        yield _images(images, pool), _targets(targets, pool), list(keys), bad.take()


def _images(images: Sequence[torch.Tensor], pool: SlotPool | None) -> Batch:
    """Stacked (b, 3, H, W); whole parts of several sizes (tiled evaluation) → a list."""
    if all(im.shape == images[0].shape for im in images):
        return _stack(images, pool)
    return list(images)


def _targets(targets: Sequence, pool: SlotPool | None) -> Batch:
    """Class indices → int64 (b,); multi-hot rows or masks of one shape → stacked; masks of
    several sizes (evaluation keeps each image's own) → a list."""
    first = targets[0]
    if isinstance(first, int):
        labels = torch.tensor(targets)
        return inline_if_small(labels) if get_worker_info() is not None else labels
    targets = [torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in targets]
    if all(t.shape == targets[0].shape for t in targets):
        return _stack(targets, pool)
    return targets


def _stack(images: Sequence[torch.Tensor], pool: SlotPool | None = None) -> Batch:
    """(b, ...) of equal tensors. In a loader worker it is built straight in shared memory, as
    torch's default collate does, so handing the batch to the main process costs no second copy:
    in one of the worker's reused slots where one is free (data/batch_pool.py), else fresh."""
    if pool is not None and (pooled := pool.stack(images)) is not None:
        return pooled
    first, out = images[0], None
    if get_worker_info() is not None:
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(images), *first.shape)
    return torch.stack(images, out=out)
