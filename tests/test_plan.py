"""The epoch plan, exhaustively: no processes, just the pure function."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data.plan import EpochPlan, Part, buffer_shuffle, consumed_per_worker

SHARD_SETS = [(5,), (3, 7, 1, 9), (100, 1, 1, 50, 2), (4, 4, 4, 4, 4, 4, 4, 4), (1, 1)]


def all_samples(sizes):
    return {(s, i) for s, n in enumerate(sizes) for i in range(n)}


def rank_reads(sizes, world, workers, batch, train, epoch=0, before=(), buffer=5, consumed=0):
    """Per rank: the batches its workers yield after `consumed`, in the order the DataLoader
    hands them over."""
    out = []
    for rank in range(world):
        plan = EpochPlan(
            sizes,
            batch,
            seed=7,
            epoch=epoch,
            world_size=world,
            rank=rank,
            num_workers=workers,
            shuffle=train,
            drop_last=train,
            buffer_size=buffer,
            before=before,
        )
        per_worker = [plan.worker_samples(w, consumed) for w in range(max(1, workers))]
        batches = [[ws[i : i + batch] for i in range(0, len(ws), batch)] for ws in per_worker]
        order = [b for rnd in itertools.zip_longest(*batches) for b in rnd if b is not None]
        assert len(order) == len(plan) - consumed
        out.append(order)
    return out


@pytest.mark.parametrize("sizes", SHARD_SETS)
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("workers", [0, 1, 2, 5])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_train_plan_equal_batches_each_sample_at_most_once(sizes, world, workers, batch):
    reads = rank_reads(sizes, world, workers, batch, train=True)
    counts = {len(r) for r in reads}
    assert len(counts) == 1, f"ranks get different batch counts {counts}"
    flat = [s for r in reads for b in r for s in b]
    assert all(len(b) == batch for r in reads for b in r)  # no partial training batch
    assert len(flat) == len(set(flat))
    dropped = sum(sizes) - len(flat)
    assert 0 <= dropped < world * batch  # only the tail under one global batch is dropped


@pytest.mark.parametrize("sizes", SHARD_SETS)
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_eval_plan_covers_every_sample_exactly_once(sizes, world, workers):
    reads = rank_reads(sizes, world, workers, 4, train=False)
    flat = [s for r in reads for b in r for s in b]
    assert sorted(flat) == sorted(all_samples(sizes))


def test_shard_order_changes_per_epoch_and_repeats_per_seed():
    sizes = tuple([10] * 20)
    a = EpochPlan(sizes, 4, seed=1, epoch=0).shard_order()
    assert list(a) == list(EpochPlan(sizes, 4, seed=1, epoch=0).shard_order())
    assert list(a) != list(EpochPlan(sizes, 4, seed=1, epoch=1).shard_order())
    assert list(a) != list(EpochPlan(sizes, 4, seed=2, epoch=0).shard_order())


def test_workers_read_contiguous_runs_within_shards():
    plan = EpochPlan((50, 50, 50, 50), 5, num_workers=4, buffer_size=0)
    for w in range(4):
        mine = plan.worker_samples(w)
        # without the buffer: one shard after another, samples ascending inside each
        assert mine == sorted(mine, key=lambda s: (list(plan.shard_order()).index(s[0]), s[1]))


def test_buffer_shuffle_is_a_bounded_permutation():
    items = [(0, i) for i in range(200)]
    out = buffer_shuffle(items, 10, np.random.default_rng(0))
    assert sorted(out) == items and out != items
    for pos, (_, i) in enumerate(out):
        assert i <= pos + 10  # never more than a buffer ahead of the read position


@pytest.mark.parametrize("consumed", [0, 1, 5, 6, 11])
def test_resume_skips_exactly_what_was_consumed(consumed):
    sizes, batch = (13, 8, 21, 5), 3
    plan = EpochPlan(sizes, batch, seed=7, epoch=2, num_workers=2, buffer_size=5)  # as rank_reads
    full = rank_reads(sizes, 1, 2, batch, train=True, epoch=2)[0]
    assert len(full) == 15
    done = consumed_per_worker(plan.batches_per_worker(), consumed)
    rest = [plan.worker_samples(w, consumed) for w in range(2)]
    seen = {s for b in full[:consumed] for s in b}
    assert sum(done) == consumed
    assert not seen & {s for ws in rest for s in ws}
    assert len(seen) + sum(map(len, rest)) == 15 * batch


def test_position_past_the_epoch_is_refused():
    with pytest.raises(ValueError, match="past the epoch"):
        consumed_per_worker([2, 2], 5)


LAYOUTS = [  # (world size, workers, batch size, shuffle buffer)
    (1, 0, 4, 0),
    (1, 2, 3, 5),
    (2, 1, 4, 8),
    (3, 2, 2, 5),
    (4, 3, 1, 1),
    (8, 1, 2, 16),
]


@pytest.mark.parametrize("sizes", [(13, 8, 21, 5, 40, 1, 9), (60,), tuple([7] * 11)])
@pytest.mark.parametrize("first", LAYOUTS)
@pytest.mark.parametrize("second", LAYOUTS)
def test_elastic_resume_trains_the_rest_of_the_epoch_exactly_once(sizes, first, second):
    """Stop at a random position under one layout, resume under another: what the first part
    trained plus what the second trains is every sample at most once, and only the tail under
    one global batch of the new layout is left out."""
    rng = np.random.default_rng(hash((sizes, first, second)) % 2**32)
    world, workers, batch, buffer = first
    full = rank_reads(sizes, world, workers, batch, train=True, epoch=3, buffer=buffer)
    if not full[0]:
        pytest.skip("the first layout has no batch for this data set")
    stop = int(rng.integers(1, len(full[0]) + 1))
    trained = [s for rank in full for b in rank[:stop] for s in b]
    part = Part(world, workers, batch, buffer, stop)

    world, workers, batch, buffer = second
    rest = rank_reads(sizes, world, workers, batch, train=True, epoch=3, before=(part,), buffer=buffer)
    assert len({len(r) for r in rest}) == 1  # equal batch counts per rank again
    assert all(len(b) == batch for r in rest for b in r)
    resumed = [s for r in rest for b in r for s in b]
    both = trained + resumed
    assert len(both) == len(set(both))
    assert 0 <= sum(sizes) - len(both) < world * batch


def test_elastic_resume_can_be_resumed_again_mid_part():
    """Crash twice in one epoch: 2 ranks, then 3 ranks from the middle of the resumed part (same
    layout: it skips batches of that part), then 1 rank."""
    sizes = (50, 17, 33, 8, 92)
    first = rank_reads(sizes, 2, 2, 4, train=True, buffer=6)
    a = Part(2, 2, 4, 6, 5)
    second = rank_reads(sizes, 3, 1, 3, train=True, before=(a,), buffer=4)
    again = rank_reads(sizes, 3, 1, 3, train=True, before=(a,), buffer=4, consumed=4)
    assert [r[4:] for r in second] == again  # the same part, continued after 4 of its batches
    b = Part(3, 1, 3, 4, 7)
    third = rank_reads(sizes, 1, 0, 5, train=True, before=(a, b), buffer=0)
    trained = [s for r in first for bt in r[:5] for s in bt] + [s for r in second for bt in r[:7] for s in bt]
    both = trained + [s for r in third for bt in r for s in bt]
    assert len(both) == len(set(both))
    assert 0 <= sum(sizes) - len(both) < 5


def test_elastic_part_keeps_reads_sequential_within_shards():
    sizes = tuple([30] * 10)
    plan = EpochPlan(sizes, 4, world_size=1, num_workers=2, buffer_size=0, before=(Part(2, 2, 4, 0, 3),))
    order = list(plan.shard_order())
    for w in range(2):
        mine = plan.worker_samples(w)
        assert mine == sorted(mine, key=lambda s: (order.index(s[0]), s[1]))
