"""The epoch plan: which samples each data-loader worker of each rank reads, in which order.

A pure function of the shard sizes and (seed, epoch, world size, rank, workers, worker id, batch
size, position). Nothing is discovered while reading, so every rank knows up front that it gets
the same number of batches, and a resumed run can rebuild the plan and skip exactly what was
consumed.

    shards ──shuffle(seed, epoch)──▶ one global sequence of (shard, sample)
           ──cut──▶ equal contiguous pieces per rank (train: the tail under world × batch dropped)
           ──cut──▶ contiguous runs of whole batches per worker (reads stay sequential in a shard)
           ──shuffle buffer(seed, epoch, rank, worker)──▶ the order the worker yields

The DataLoader takes batches from its workers round-robin (worker 0, 1, ..., skipping workers
that have finished), so the rank's batch order, and hence a position, is also fixed by the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Sample = tuple[int, int]  # (shard number in the index, sample number inside that shard)


@dataclass(frozen=True)
class EpochPlan:
    """Everything that fixes one rank's reads for one epoch."""

    shard_sizes: tuple[int, ...]  # samples per shard, in index order
    batch_size: int  # per rank
    seed: int = 0
    epoch: int = 0
    world_size: int = 1
    rank: int = 0
    num_workers: int = 1  # 0 loader processes still means one reader (the main process)
    shuffle: bool = True
    drop_last: bool = True  # train: equal full batches per rank; eval: every sample once
    buffer_size: int = 0  # within-worker shuffle buffer, samples

    def shard_order(self) -> np.ndarray:
        """The epoch's shard order: shuffled as a whole from (seed, epoch); samples keep file order."""
        order = np.arange(len(self.shard_sizes))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return order

    def sequence(self, start: int = 0, stop: int | None = None) -> list[Sample]:
        """Items [start, stop) of the epoch's global order, built without listing the rest
        (a worker of a million-sample epoch materialises only its own piece)."""
        order = self.shard_order()
        sizes = np.asarray(self.shard_sizes)[order]
        ends = np.cumsum(sizes)
        stop = int(ends[-1]) if stop is None else stop
        out: list[Sample] = []
        k = int(np.searchsorted(ends, start, side="right"))
        while k < len(order) and start < stop:
            offset = start - (int(ends[k]) - int(sizes[k]))
            take = min(int(ends[k]), stop) - start
            out.extend((int(order[k]), i) for i in range(offset, offset + take))
            start += take
            k += 1
        return out

    def rank_range(self) -> tuple[int, int]:
        """[start, stop) of this rank's piece of `sequence()`."""
        total = sum(self.shard_sizes)
        if self.drop_last:
            per_rank = total // (self.world_size * self.batch_size) * self.batch_size
            return self.rank * per_rank, (self.rank + 1) * per_rank
        base, extra = divmod(total, self.world_size)  # first `extra` ranks take one more
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def batches_per_worker(self) -> list[int]:
        start, stop = self.rank_range()
        batches = -(-(stop - start) // self.batch_size)  # the last may be partial (eval only)
        base, extra = divmod(batches, max(1, self.num_workers))
        return [base + (w < extra) for w in range(max(1, self.num_workers))]

    def __len__(self) -> int:
        """Batches this rank yields in the epoch."""
        return sum(self.batches_per_worker())

    def worker_samples(self, worker: int, consumed_batches: int = 0) -> list[Sample]:
        """What `worker` yields, in order, after the rank has consumed `consumed_batches`."""
        counts = self.batches_per_worker()
        start, stop = self.rank_range()
        first = start + sum(counts[:worker]) * self.batch_size
        mine = self.sequence(first, min(stop, first + counts[worker] * self.batch_size))
        if self.shuffle and self.buffer_size > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            mine = buffer_shuffle(mine, self.buffer_size, rng)
        skip = consumed_per_worker(counts, consumed_batches)[worker] * self.batch_size
        return mine[skip:]


def buffer_shuffle(items: Sequence[Sample], size: int, rng: np.random.Generator) -> list[Sample]:
    """What a streaming shuffle buffer of `size` yields: fill, then emit a random slot and refill
    it with the next item. Each output is at most `size` items ahead of the read position, so a
    reader that follows this order keeps at most about `size` samples in memory."""
    out, buf = [], list(items[:size])
    for item in items[size:]:
        j = int(rng.integers(len(buf)))
        out.append(buf[j])
        buf[j] = item
    out.extend(buf[j] for j in rng.permutation(len(buf)))
    return out


def consumed_per_worker(counts: Sequence[int], consumed_batches: int) -> list[int]:
    """Batches each worker had delivered after the rank consumed `consumed_batches`, given the
    round-robin order in which the DataLoader collects them."""
    if consumed_batches > sum(counts):
        raise ValueError(f"position {consumed_batches} batches is past the epoch ({sum(counts)})")
    done = [0] * len(counts)
    left = consumed_batches
    while left:
        for w, count in enumerate(counts):
            if left and done[w] < count:
                done[w] += 1
                left -= 1
    return done
