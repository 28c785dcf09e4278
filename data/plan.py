"""The epoch plan: which samples each data-loader worker of each rank reads, in which order.

A pure function of the shard sizes and (seed, epoch, world size, rank, workers, worker id, batch
size, position). Nothing is discovered while reading, so every rank knows up front that it gets
the same number of batches, and a resumed run can rebuild the plan and skip exactly what was
consumed.

    shards ──shuffle(seed, epoch)──▶ one global order of (shard, sample); a position is an index in it
           ──minus what earlier parts of the epoch trained (elastic resume only)──▶ the pool
           ──cut──▶ equal contiguous pieces per rank (train: the tail under world × batch dropped)
           ──cut──▶ contiguous runs of whole batches per worker (reads stay sequential in a shard)
           ──shuffle buffer(seed, epoch, rank, worker)──▶ the order the worker yields

The DataLoader takes batches from its workers round-robin (worker 0, 1, ..., skipping workers
that have finished), so the rank's batch order, and hence a position, is also fixed by the plan.

Elastic resume: a run that resumes mid-epoch under another world size, worker count, batch size
or shuffle buffer cannot skip "the first c batches" of a plan cut differently. Instead the part
already trained becomes a `Part` of the new plan: its samples are recomputed exactly (the plan is
pure) and taken out of the pool, and the rest of the epoch is cut afresh for the new layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

Sample = tuple[int, int]  # (shard number in the index, sample number inside that shard)


@dataclass(frozen=True)
class Part:
    """An earlier part of the epoch, trained under other settings before an elastic resume."""

    world_size: int
    num_workers: int
    batch_size: int
    buffer_size: int
    batches: int  # batches each rank consumed in that part (DDP ranks step together)


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
    before: tuple[Part, ...] = ()  # parts of this epoch already trained (elastic resume)

    def shard_order(self) -> np.ndarray:
        """The epoch's shard order: shuffled as a whole from (seed, epoch); samples keep file order."""
        order = np.arange(len(self.shard_sizes))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return order

    def samples_at(self, positions: Sequence[int]) -> list[Sample]:
        """The (shard, sample) at each position of the epoch's global order."""
        order = self.shard_order()
        sizes = np.asarray(self.shard_sizes, dtype=np.int64)[order]
        ends = np.cumsum(sizes)
        pos = np.asarray(positions, dtype=np.int64)
        k = np.searchsorted(ends, pos, side="right")
        return list(zip(order[k].tolist(), (pos - ends[k] + sizes[k]).tolist()))

    def pool(self) -> np.ndarray | None:
        """Positions this plan cuts up, ascending: those the earlier parts left (None: all)."""
        if not self.before:
            return None
        return _untrained(self.shard_sizes, self.seed, self.epoch, self.shuffle, self.before)

    def rank_range(self) -> tuple[int, int]:
        """[start, stop) of this rank's piece of the pool."""
        pool = self.pool()
        total = sum(self.shard_sizes) if pool is None else len(pool)
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
        """Batches this rank yields in the epoch (in this part of it, after an elastic resume)."""
        return sum(self.batches_per_worker())

    def worker_positions(self, worker: int) -> list[int]:
        """Positions `worker` yields over the whole part, in order (a worker of a million-sample
        epoch materialises only its own piece)."""
        counts = self.batches_per_worker()
        start, stop = self.rank_range()
        first = start + sum(counts[:worker]) * self.batch_size
        last = min(stop, first + counts[worker] * self.batch_size)
        pool = self.pool()
        mine = list(range(first, last)) if pool is None else pool[first:last].tolist()
        if self.shuffle and self.buffer_size > 1:
            # A resumed part draws anew, so its buffer does not replay the first part's choices.
            parts = [len(self.before)] if self.before else []
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, *parts])
            mine = buffer_shuffle(mine, self.buffer_size, rng)
        return mine

    def worker_samples(self, worker: int, consumed_batches: int = 0) -> list[Sample]:
        """What `worker` yields, in order, after the rank has consumed `consumed_batches`."""
        done = consumed_per_worker(self.batches_per_worker(), consumed_batches)[worker]
        return self.samples_at(self.worker_positions(worker)[done * self.batch_size :])

    def resumed(self, part: Part) -> EpochPlan:
        """This epoch's plan after `part` (trained under other settings) is taken out."""
        return replace(self, before=(*self.before, part))


@lru_cache(maxsize=4)  # every worker asks once per part; a plan object is rebuilt per pass
def _untrained(
    shard_sizes: tuple[int, ...], seed: int, epoch: int, shuffle: bool, before: tuple[Part, ...]
) -> np.ndarray:
    left = np.ones(sum(shard_sizes), dtype=bool)
    for k, part in enumerate(before):
        for rank in range(part.world_size):
            plan = EpochPlan(
                shard_sizes,
                part.batch_size,
                seed,
                epoch,
                part.world_size,
                rank,
                part.num_workers,
                shuffle,
                True,
                part.buffer_size,
                before[:k],
            )
            done = consumed_per_worker(plan.batches_per_worker(), part.batches)
            for worker, batches in enumerate(done):
                left[plan.worker_positions(worker)[: batches * part.batch_size]] = False
    return np.flatnonzero(left)


def buffer_shuffle(items: Sequence, size: int, rng: np.random.Generator) -> list:
    """What a streaming shuffle buffer of `size` yields: fill, then emit a random slot and refill
    it with the next item. Each output is at most `size` items ahead of the read position, so a
    reader that follows this order keeps at most about `size` samples in memory."""
    out, buf = [], list(items[:size])
    # The buffer stays full while items remain, so every slot draw is over len(buf): drawn in
    # one call, since a call per item would be most of the cost at millions of samples.
    slots = rng.integers(len(buf), size=max(0, len(items) - size)).tolist()
    for item, j in zip(items[size:], slots):
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
