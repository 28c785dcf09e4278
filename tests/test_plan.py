"""The epoch plan, exhaustively: no processes, just the pure function."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data.plan import EpochPlan, Mix, Part, buffer_shuffle, consumed_per_worker

SHARD_SETS = [(5,), (3, 7, 1, 9), (100, 1, 1, 50, 2), (4, 4, 4, 4, 4, 4, 4, 4), (1, 1)]


def all_samples(sizes):
    return {(s, i) for s, n in enumerate(sizes) for i in range(n)}


def rank_reads(sizes, world, workers, batch, train, epoch=0, before=(), buffer=5, consumed=0, **kw):
    """Per rank: the batches its workers yield after `consumed`, in the order the DataLoader
    hands them over (`kw`: the plan's mix and block)."""
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
            **kw,
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


ORDERS = {  # how the epoch's global order is drawn: whole shards; blocks; two weighted sources
    "shards": {},
    "blocks": {"block": 10},
    "mix": {"mix": Mix(bounds=(0, 2, 4), counts=(30, 70))},
}


@pytest.mark.parametrize(
    ("sizes", "order"),
    [
        (sizes, order)
        for sizes in [(13, 8, 21, 5, 40, 1, 9), (60,), tuple([7] * 11)]
        for order in ORDERS
        if order != "mix" or len(sizes) >= 4  # the mix takes two shards per source
    ],
)
@pytest.mark.parametrize("first", LAYOUTS)
@pytest.mark.parametrize("second", LAYOUTS)
def test_elastic_resume_trains_the_rest_of_the_epoch_exactly_once(sizes, order, first, second):
    """Stop at a random position under one layout, resume under another: what the first part
    trained plus what the second trains is every sample at most once, and only the tail under
    one global batch of the new layout is left out."""
    kw = ORDERS[order]
    rng = np.random.default_rng(hash((sizes, first, second)) % 2**32)
    world, workers, batch, buffer = first
    full = rank_reads(sizes, world, workers, batch, train=True, epoch=3, buffer=buffer, **kw)
    if not full[0]:
        pytest.skip("the first layout has no batch for this data set")
    stop = int(rng.integers(1, len(full[0]) + 1))
    trained = [s for rank in full for b in rank[:stop] for s in b]
    part = Part(world, workers, batch, buffer, stop)

    world, workers, batch, buffer = second
    rest = rank_reads(sizes, world, workers, batch, train=True, epoch=3, before=(part,), buffer=buffer, **kw)
    assert len({len(r) for r in rest}) == 1  # equal batch counts per rank again
    assert all(len(b) == batch for r in rest for b in r)
    resumed = [s for r in rest for b in r for s in b]
    both = trained + resumed
    assert len(both) == len(set(both))
    length = sum(kw["mix"].counts) if "mix" in kw else sum(sizes)
    assert 0 <= length - len(both) < world * batch


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


def source_counts(samples, sizes, mix):
    """Samples per source, and how often each underlying (shard, sample) was drawn."""
    per_source = [0] * len(mix.counts)
    drawn: dict = {}
    for shard, i in samples:
        per_source[mix.source_of(shard)] += 1
        key = (shard, i % sizes[shard])
        drawn[key] = drawn.get(key, 0) + 1
    return per_source, drawn


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_mix_gives_each_source_its_share_up_or_down(world, workers):
    """Source A (3 shards, 30 samples) gives 12 a epoch: down-sampled, each sample at most once.
    Source B (2 shards, 10 samples) gives 25: read two and a half times, each sample 2 or 3 times,
    every draw a distinct planned sample, so the stream reads each from its own pass."""
    sizes = (10, 10, 10, 5, 5)
    mix = Mix(bounds=(0, 3, 5), counts=(12, 25))
    reads = rank_reads(sizes, world, workers, 1, train=True, mix=mix)
    flat = [s for r in reads for b in r for s in b]
    assert len(flat) == len(set(flat)) == 37 - 37 % world
    per_source, drawn = source_counts(flat, sizes, mix)
    if world == 1:
        assert per_source == [12, 25]
        assert sorted(n for (shard, _), n in drawn.items() if shard >= 3) == [2] * 5 + [3] * 5
        assert max(n for (shard, _), n in drawn.items() if shard < 3) == 1
    assert all(i < 3 * sizes[shard] for shard, i in flat)


def test_a_mix_changes_per_epoch_repeats_per_seed_and_comes_round_evenly():
    sizes = tuple([10] * 20 + [10] * 5)
    mix = Mix(bounds=(0, 20, 25), counts=(60, 40))  # A down to 0.3 of itself, B under 1
    epochs = [EpochPlan(sizes, 4, seed=1, epoch=e, mix=mix).samples_at(range(100)) for e in range(20)]
    assert epochs[0] == EpochPlan(sizes, 4, seed=1, epoch=0, mix=mix).samples_at(range(100))
    assert epochs[0] != epochs[1]
    assert epochs[0] != EpochPlan(sizes, 4, seed=2, epoch=0, mix=mix).samples_at(range(100))
    seen = np.zeros(200, int)  # A's 200 samples over 20 epochs of 60 draws: 6 times each on average
    for samples in epochs:
        for shard, i in samples:
            if shard < 20:
                seen[shard * 10 + i] += 1
    assert seen.sum() == 1200 and seen.min() >= 1 and seen.max() <= 12


def test_eval_plans_ignore_the_mix():
    """Validation reads every sample of every source once: weights are for training."""
    sizes = (4, 6, 5)
    mix = Mix(bounds=(0, 2, 3), counts=(50, 1))
    reads = rank_reads(sizes, 2, 1, 4, train=False, mix=mix)
    assert sorted(s for r in reads for b in r for s in b) == sorted(all_samples(sizes))


@pytest.mark.parametrize("sizes", SHARD_SETS)
@pytest.mark.parametrize("block", [2, 7, 64])
def test_block_shuffle_keeps_every_sample_once_and_stays_in_its_block(sizes, block):
    plain = EpochPlan(sizes, 1, seed=3, epoch=1)
    shuffled = EpochPlan(sizes, 1, seed=3, epoch=1, block=block)
    n = sum(sizes)
    before = plain.samples_at(range(n))
    after = shuffled.samples_at(range(n))
    assert sorted(after) == sorted(before)
    place = {s: p for p, s in enumerate(before)}
    assert all(place[s] // block == p // block for p, s in enumerate(after))


def test_block_shuffle_mixes_shards_a_buffer_cannot():
    """Shards of 1,000 samples (each one class, as a tool writing class by class makes them):
    a buffer of 100 leaves batches of 32 drawn from one or two shards; blocks of 4 shards mix them."""
    sizes = tuple([1000] * 8)

    def shards_per_batch(plan):
        samples = plan.worker_samples(0)
        return np.mean([len({s for s, _ in samples[i : i + 32]}) for i in range(0, len(samples), 32)])

    buffered = shards_per_batch(EpochPlan(sizes, 32, buffer_size=100))
    blocks = shards_per_batch(EpochPlan(sizes, 32, buffer_size=100, block=4000))
    assert buffered < 1.5 and blocks > 3.5


def test_a_shard_cut_short_gives_a_window_at_a_place_drawn_per_epoch():
    """One source of two 10-sample shards gives 15 a epoch: one shard whole, five of the other. Over
    epochs every sample of the cut shard is drawn, not only its first five."""
    mix = Mix(bounds=(0, 2), counts=(15,))
    seen = set()
    for epoch in range(30):
        samples = EpochPlan((10, 10), 5, epoch=epoch, mix=mix).samples_at(range(15))
        assert len(set(samples)) == 15
        seen |= set(samples)
    assert seen == all_samples((10, 10))
