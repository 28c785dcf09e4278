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

from data.batch_pool import PooledTensor, SlotPool
from data.errors import UserError
from data.samples import is_left_out

Batch = torch.Tensor | PooledTensor | list[torch.Tensor]


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
                yield from _split(pending, owed, bad, pool)
                last, pending, owed = pending, [], 0
    if positions % size:  # the last, partial group (evaluation only)
        owed += 1
    if owed and len(pending) >= owed:
        yield from _split(pending, owed, bad, pool)
    elif owed and last and any(is_left_out(r) for r in bad.counts):
        # Defects a task leaves out on purpose (task=anomaly) emptied the worker's last groups:
        # they are paid with the samples of its last batch again, so the batch count still holds.
        yield from _split((pending + last * owed)[: max(owed, len(pending))], owed, bad, pool)
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
        return torch.tensor(targets)
    targets = [torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in targets]
    if all(t.shape == targets[0].shape for t in targets):
        return _stack(targets, pool)
    return targets


def _stack(images: Sequence[torch.Tensor], pool: SlotPool | None = None) -> torch.Tensor | PooledTensor:
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
