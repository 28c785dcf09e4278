"""Batches built in shared memory that a loader worker reuses, instead of fresh memory per batch.

A loader worker hands each batch to the main process in shared memory. Memory fresh from the
kernel costs a page fault per 4 KiB on first touch: a 256 x 3 x 224 x 224 uint8 batch (38.5 MB)
is 9,400 faults, 47 to 66 ms on a 2-core VM against 7 ms to fill memory already mapped, about
0.2 ms per image and most of the loader's fixed cost per sample (scripts/bench_stages.py).
So each worker keeps a few slots of shared memory and refills a slot once the main
process has let go of the batch it held:

    worker                                     main process
    slot free (flag 0) → flag 1 (`rows`), each
      image copied into its row as it is made
      (data/batching.py), or `stack` into it
    hand over PooledTensor ──────────────────→ unpickled as a plain tensor over the slot
      (the slot's storage goes once, at its       (its storage kept, keyed by pool, worker
       first use; after that, just its number)     and slot), whose last reference going
                                                   sets the flag back to 0

The main process's tensor is a view built through numpy (torch.from_numpy), so its storage is
its own object whatever views or pinned copies are made of it; when the last of them is gone
the slot is free. A slot still held (a consumer keeping batches) is never written: with no slot
free, the worker stacks into fresh shared memory as before, so a slow or greedy consumer costs
speed, never correctness.

Slot layout: an 8-byte flag (int64: 1 from its reservation until the main process lets go), then
the tensor.
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch

HEADER = 8  # bytes: the slot's in-use flag, int64
SLOTS = 8  # per worker: prefetch (2 batches by default) + those in use, images and masks
MIN_BYTES = 1 << 16  # 16 pages: smaller tensors (labels, multi-hot rows) gain little from a slot

# Main process: (pool, worker pid, slot) → the slot's whole storage as uint8, mapped once. A pool
# is one stream's; `release(pool)` forgets its slots when its workers are gone.
_RECEIVED: dict[tuple[str, int, int], torch.Tensor] = {}
_LOCK = threading.Lock()  # a pin-memory thread unpickles batches beside the main thread


class SlotPool:
    """One loader worker's slots. `stack(tensors)` is torch.stack into a free slot, as a
    PooledTensor to hand over; or None where no slot is free or the batch is small."""

    def __init__(self, pool: str, slots: int = SLOTS):
        self.pool, self.limit, self.pid = pool, slots, os.getpid()
        self.slots: list[torch.Tensor] = []  # uint8 (HEADER + capacity,) in shared memory
        self.sent: list[bool] = []  # has the main process been given this slot's storage

    def stack(self, tensors) -> PooledTensor | None:
        reserved = self.rows(tensors[0], len(tensors))
        if reserved is None:
            return None
        slot, rows = reserved
        torch.stack(tensors, out=rows)
        return self.hand(slot, rows, len(tensors))

    def rows(self, like: torch.Tensor, count: int) -> tuple[int, torch.Tensor] | None:
        """A free slot reserved for `count` tensors shaped like `like`: (its number, a (count,
        *like.shape) view to fill); None where no slot is free or the batch is small. Hand it
        over with `hand`, or give it back unused with `unreserve`."""
        nbytes = count * like.numel() * like.element_size()
        if nbytes < MIN_BYTES:
            return None
        i = self._free(nbytes)
        if i is None:
            return None
        slot = self.slots[i]
        slot[:HEADER].view(torch.int64)[0] = 1  # before the main process can see the batch: it clears it
        return i, slot[HEADER : HEADER + nbytes].view(like.dtype).view(count, *like.shape)

    def hand(self, i: int, rows: torch.Tensor, count: int) -> PooledTensor:
        """The first `count` of reserved slot `i`'s `rows`, as a PooledTensor for the main process."""
        storage = None if self.sent[i] else self.slots[i]
        self.sent[i] = True
        return PooledTensor(self.pool, self.pid, i, (count, *rows.shape[1:]), rows.dtype, storage)

    def unreserve(self, i: int) -> None:
        self.slots[i][:HEADER].view(torch.int64)[0] = 0

    def _free(self, nbytes: int) -> int | None:
        """A free slot that fits `nbytes` without wasting more than half of itself, or a new one."""
        for i, slot in enumerate(self.slots):
            capacity = slot.numel() - HEADER
            if nbytes <= capacity <= 2 * nbytes and int(slot[:HEADER].view(torch.int64)[0]) == 0:
                return i
        if len(self.slots) >= self.limit:
            return None
        storage = torch.UntypedStorage._new_shared(HEADER + nbytes)
        self.slots.append(torch.empty(0, dtype=torch.uint8).set_(storage))
        self.sent.append(False)
        return len(self.slots) - 1


class PooledTensor:
    """A batch in a worker's slot, on its way to the main process, where it unpickles as a
    plain tensor (`_received`). Not a tensor in the worker: only batching makes one."""

    __slots__ = ("dtype", "pid", "pool", "shape", "slot", "storage")

    def __init__(self, pool: str, pid: int, slot: int, shape: tuple, dtype: torch.dtype, storage):
        self.pool, self.pid, self.slot, self.shape, self.dtype = pool, pid, slot, shape, dtype
        self.storage = storage  # the slot's uint8 tensor at its first hand-over, else None

    def __reduce__(self):
        return _received, (self.pool, self.pid, self.slot, self.shape, self.dtype, self.storage)


def _received(pool: str, pid: int, slot: int, shape: tuple, dtype: torch.dtype, storage) -> torch.Tensor:
    """The batch in the main process: a tensor over the slot, whose end frees the slot."""
    key = (pool, pid, slot)
    with _LOCK:
        if storage is not None:
            _RECEIVED[key] = storage
        whole = _RECEIVED[key].numpy()  # uint8 (HEADER + capacity,)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    body = whole[HEADER : HEADER + nbytes]  # a new ndarray: the storage made from it owns it
    weakref.finalize(body, _set_free, whole[:HEADER].view(np.int64))
    return torch.from_numpy(body).view(dtype).view(shape)


INLINE_BYTES = 1 << 14  # 16 KiB: 2,048 labels. What a worker pickles into the queue's pipe (64 KiB)
# must stay small: a worker whose main process was killed flushes its queued batches at exit, and
# blocks for ever on a full pipe (a test of a SIGKILLed run hung with 49 KB batches inline).


class InlineTensor:
    """A batch's class labels on their way to the main process, pickled with the batch. Torch
    would put them in fresh shared memory and pass the file descriptor over a socket, with a
    handshake, per tensor. For 256 labels from 2 workers yielding nothing else, the main process
    spent 0.44 ms of CPU per batch that way against 0.13 ms inline, and a batch took 2.3 ms
    against 1.0 ms: about 5 us a sample."""

    __slots__ = ("array",)

    def __init__(self, tensor: torch.Tensor):
        self.array = tensor.numpy()

    def __reduce__(self):
        return torch.from_numpy, (self.array,)


def inline_if_small(tensor: torch.Tensor) -> torch.Tensor | InlineTensor:
    """`tensor` as a loader worker hands it over: inline up to INLINE_BYTES, else as it is."""
    return InlineTensor(tensor) if tensor.nbytes <= INLINE_BYTES else tensor


def _set_free(flag: np.ndarray) -> None:
    flag[0] = 0


def release(pool: str) -> None:
    """Forget a pool's slots in the main process (its workers have exited); batches still held
    keep their own memory alive."""
    with _LOCK:
        for key in [k for k in _RECEIVED if k[0] == pool]:
            del _RECEIVED[key]
