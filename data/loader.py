"""The DataLoader of a planned stream: each pass settles its epoch, plan and resume position."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from data import batch_pool
from data.plan import EpochPlan
from data.stream import ShardStream


class PlannedLoader(DataLoader):
    """A DataLoader that settles the epoch, the plan and the resume position at the start of
    every pass. Persistent workers keep the plan they started with and read each pass's epoch
    and position from the stream's shared `position`; a pass under another plan (the first epoch
    after an elastic resume) starts them afresh.

    `settle(plan)` gives (the plan for this pass, batches Lightning counted before it, batches of
    it already consumed); `length` says how many batches Lightning will count for the pass.
    """

    def __init__(
        self,
        stream: ShardStream,
        settle: Callable[[EpochPlan], tuple[EpochPlan, int, int]],
        length: Callable[[], int],
        **kw,
    ):
        super().__init__(stream, batch_size=None, **kw)
        self._settle, self._length = settle, length
        self._workers_plan: EpochPlan | None = None  # what running persistent workers hold
        # The main process's map of the workers' batch slots goes with the loader.
        weakref.finalize(self, batch_pool.release, stream.pool_id)

    def __len__(self) -> int:
        return self._length()

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # Decided at the first batch, not at iter(): Lightning creates an epoch's iterator
        # before a restore has settled which epoch it is.
        plan, _, consumed = self._settle(self.dataset.plan)
        if self._iterator is not None and replace(plan, epoch=0) != self._workers_plan:
            self._iterator._shutdown_workers()
            self._iterator = None
            batch_pool.release(self.dataset.pool_id)
        if self._iterator is None:
            self._workers_plan = replace(plan, epoch=0)
        self.dataset.plan = plan
        self.dataset.position.copy_(torch.tensor([plan.epoch, consumed]))
        try:
            yield from super().__iter__()
        finally:
            if not self.persistent_workers:  # this pass's workers are gone, and their slots
                batch_pool.release(self.dataset.pool_id)
