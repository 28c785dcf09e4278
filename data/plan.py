"""The epoch plan: which samples each data-loader worker of each rank reads, in which order.

A pure function of the shard sizes and (seed, epoch, world size, rank, workers, worker id, batch
size, position). Nothing is discovered while reading, so every rank knows up front that it gets
the same number of batches, and a resumed run can rebuild the plan and skip exactly what was
consumed.

    shards ──shuffle(seed, epoch)──▶ one global order of (shard, sample); a position is an index in it
           (data.mix: each source's share of the epoch drawn as whole shards, see `Mix`;
           data.shuffle_block: samples shuffled within blocks of positions that span shards)
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

# (shard number in the index, sample number inside that shard). An up-sampled source reads a
# shard of n samples again within one epoch: its samples then count on past n (i = repeat × n + j
# for sample j), so every planned sample stays distinct and is read from its own pass.
Sample = tuple[int, int]


@dataclass(frozen=True)
class Mix:
    """Several data sets in one plan, drawn by weight (data/mix.py builds it from data.mix).

    Source k owns the shards [bounds[k], bounds[k+1]) of the plan's list and gives `counts[k]`
    samples to every epoch: its shards in an order drawn from (seed, epoch, k), taken whole, the
    last one cut short (a window of it at a place drawn per epoch); a source that gives more
    samples than it holds is read again (a repeat, in a fresh order). Whole shards keep reads
    sequential, and over epochs every sample of a down-sampled source comes round about equally
    often. The runs of all sources are then shuffled
    together, so the epoch interleaves sources at shard granularity; the shuffle buffer (or a block
    shuffle) mixes them within batches.
    """

    bounds: tuple[int, ...]  # K + 1 shard numbers: where each source's shards start, then the end
    counts: tuple[int, ...]  # samples per epoch of each source

    def source_of(self, shard: int) -> int:
        return int(np.searchsorted(self.bounds, shard, side="right")) - 1


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
    mix: Mix | None = None  # several weighted data sets (training only)
    block: int = 0  # training: positions shuffled within blocks of this many samples (0: not)

    @property
    def length(self) -> int:
        """Samples in the epoch's global order."""
        return sum(self.mix.counts) if self.mix and self.shuffle else sum(self.shard_sizes)

    def shard_order(self) -> np.ndarray:
        """The epoch's shard order: shuffled as a whole from (seed, epoch); samples keep file order."""
        order = np.arange(len(self.shard_sizes))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return order

    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's global order as runs of consecutive samples: (shard, first sample, length)
        per run, int64 (R,) each. Without a mix, each shard whole in `shard_order()`."""
        if self.mix and self.shuffle:
            return _mix_runs(self.shard_sizes, self.mix, self.seed, self.epoch)
        order = self.shard_order()
        return order, np.zeros_like(order), np.asarray(self.shard_sizes, dtype=np.int64)[order]

    def samples_at(self, positions: Sequence[int]) -> list[Sample]:
        """The (shard, sample) at each position of the epoch's global order."""
        shards, starts, lengths = self.runs()
        ends = np.cumsum(lengths)
        pos = np.asarray(positions, dtype=np.int64)
        if self.block > 1 and self.shuffle:
            pos = _blocks_shuffled(pos, self.block, self.length, self.seed, self.epoch)
        k = np.searchsorted(ends, pos, side="right")
        return list(zip(shards[k].tolist(), (starts[k] + pos - ends[k] + lengths[k]).tolist()))

    def pool(self) -> np.ndarray | None:
        """Positions this plan cuts up, ascending: those the earlier parts left (None: all)."""
        if not self.before:
            return None
        return _untrained(replace(self, world_size=1, rank=0, before=()), self.before)

    def rank_range(self) -> tuple[int, int]:
        """[start, stop) of this rank's piece of the pool."""
        pool = self.pool()
        total = self.length if pool is None else len(pool)
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
def _untrained(base: EpochPlan, before: tuple[Part, ...]) -> np.ndarray:
    """Positions of `base`'s epoch that the `before` parts left untrained, ascending."""
    left = np.ones(base.length, dtype=bool)
    for k, part in enumerate(before):
        for rank in range(part.world_size):
            plan = replace(
                base,
                batch_size=part.batch_size,
                world_size=part.world_size,
                rank=rank,
                num_workers=part.num_workers,
                drop_last=True,
                buffer_size=part.buffer_size,
                before=before[:k],
            )
            done = consumed_per_worker(plan.batches_per_worker(), part.batches)
            for worker, batches in enumerate(done):
                left[plan.worker_positions(worker)[: batches * part.batch_size]] = False
    return np.flatnonzero(left)


@lru_cache(maxsize=4)  # every position lookup of a pass needs the same runs
def _mix_runs(
    shard_sizes: tuple[int, ...], mix: Mix, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    runs: list[tuple[int, int, int]] = []
    for k, want in enumerate(mix.counts):
        own = np.arange(mix.bounds[k], mix.bounds[k + 1])
        if want and not sizes[own].sum():
            raise ValueError(f"source {k} of the mix has no samples to give {want}")
        repeat = 0
        while want > 0:  # one pass over the source's shards per repeat, each in a fresh order
            rng = np.random.default_rng([seed, epoch, k + 1, repeat])
            for shard in own[rng.permutation(len(own))]:
                size = int(sizes[shard])
                take = min(size, want)
                if take:
                    # the shard cut short gives a window at a place drawn per epoch, not its head
                    offset = int(rng.integers(size - take + 1))
                    runs.append((int(shard), repeat * size + offset, take))
                    want -= take
                if not want:
                    break
            repeat += 1
    table = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    table = table[np.random.default_rng([seed, epoch]).permutation(len(table))]
    return table[:, 0], table[:, 1], table[:, 2]


def _blocks_shuffled(pos: np.ndarray, block: int, length: int, seed: int, epoch: int) -> np.ndarray:
    """Each position's place in the order before the block shuffle: positions are permuted
    within consecutive blocks of `block` (the last block may be shorter), so samples of the
    several shards a block spans mix evenly."""
    out = np.empty_like(pos)
    index = pos // block
    for b in np.unique(index):
        here = index == b
        start = int(b) * block
        out[here] = (
            start + _block_permutation(seed, epoch, int(b), min(block, length - start))[pos[here] - start]
        )
    return out


@lru_cache(maxsize=8)
def _block_permutation(seed: int, epoch: int, block: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0, block]).permutation(size)


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
