"""Batch slots a loader worker reuses (data/batch_pool.py): a batch the main process still holds
is never written over, a free slot is reused, and nothing is lost when every slot is held."""

from __future__ import annotations

import gc
import io
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing

from data import batch_pool
from data.batch_pool import MIN_BYTES, SlotPool
from data.datamodule import ShardDataModule


def hand_over(obj):
    """What a loader worker's queue does to a batch: pickled by torch's ForkingPickler."""
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return pickle.loads(buf.getvalue())


def images(n: int, value: int) -> list[torch.Tensor]:
    return [torch.full((3, 64, 64), value + i, dtype=torch.uint8) for i in range(n)]


@pytest.fixture
def pool():
    p = SlotPool("test-pool", slots=2)
    yield p
    batch_pool.release("test-pool")


def test_a_slot_is_written_again_only_once_its_batch_is_let_go(pool):
    sent = pool.stack(images(8, 0))
    assert sent.storage is not None, "a slot's first batch carries the slot's storage"
    first = hand_over(sent)
    assert torch.equal(first, torch.stack(images(8, 0)))
    second = hand_over(pool.stack(images(8, 100)))
    assert len(pool.slots) == 2, "the first slot is held: a second one is made"
    assert pool.stack(images(8, 200)) is None, "every slot held: the caller stacks into fresh memory"
    assert torch.equal(first, torch.stack(images(8, 0))), "a held batch is never written over"

    view = first[2:4]  # a view keeps the slot held, whatever happened to the batch tensor
    del first
    gc.collect()
    assert pool.stack(images(8, 50)) is None
    del view
    sent = pool.stack(images(8, 50))
    assert sent.slot == 0 and sent.storage is None, "the slot's storage went once: now its number"
    third = hand_over(sent)
    assert len(pool.slots) == 2 and torch.equal(third, torch.stack(images(8, 50)))
    assert torch.equal(second, torch.stack(images(8, 100)))


def test_a_pinned_or_copied_batch_frees_its_slot(pool):
    batch = hand_over(pool.stack(images(8, 0)))
    copy = batch.clone()
    del batch
    again = hand_over(pool.stack(images(8, 7)))
    assert len(pool.slots) == 1 and torch.equal(copy, torch.stack(images(8, 0)))
    assert torch.equal(again, torch.stack(images(8, 7)))


def test_small_batches_and_ill_fitting_slots_are_not_pooled(pool):
    small = [torch.zeros(8, dtype=torch.int64)] * 4
    assert pool.stack(small) is None and not pool.slots
    big = hand_over(pool.stack(images(32, 0)))
    del big
    # A batch under half a free slot's size gets a slot of its own rather than waste it.
    assert hand_over(pool.stack(images(8, 0))).shape == (8, 3, 64, 64) and len(pool.slots) == 2


def test_workers_batches_held_by_the_consumer_stay_intact(tiny_index):
    """A consumer holding every batch of the pass (more than a worker's slots) sees each
    sample's pixels as a single-process loader gives them, and a second pass reuses the slots."""
    size = 128  # 2 x 3 x 128 x 128 bytes per batch: over MIN_BYTES, so pooled
    assert 2 * 3 * size * size >= MIN_BYTES

    def by_key(workers: int, keep: list | None = None) -> dict[str, torch.Tensor]:
        dm = ShardDataModule(tiny_index, batch_size=2, num_workers=workers, image_size=size)
        loader = dm.val_dataloader()
        batches = list(loader)  # 30 batches, 15 a worker: more than its 8 slots
        if keep is not None:
            keep.append(loader.dataset.pool_id)
            keep.append(sum(k[0] == loader.dataset.pool_id for k in batch_pool._RECEIVED))
        return {k: im for images, _, keys, _ in batches for k, im in zip(keys, images, strict=True)}

    truth = by_key(0)
    seen: list = []
    held = by_key(2, seen)
    assert held.keys() == truth.keys() and len(held) == 60
    assert all(torch.equal(held[k], truth[k]) for k in truth)
    assert 0 < seen[1] <= 2 * batch_pool.SLOTS, "slots were used, and no more than the workers hold"
    assert not any(k[0] == seen[0] for k in batch_pool._RECEIVED), "forgotten once the workers ended"


def test_a_batchs_labels_go_inline_not_through_fresh_shared_memory(tiny_index):
    """Labels (256 x 8 bytes) would cost a shared-memory file and a socket handshake per batch."""

    def first(workers: int):
        dm = ShardDataModule(tiny_index, batch_size=2, num_workers=workers, image_size=32)
        return next(iter(dm.val_dataloader()))

    _, labels, keys, _ = first(1)
    _, truth, truth_keys, _ = first(0)
    assert keys == truth_keys and torch.equal(labels, truth) and labels.dtype == torch.int64
    assert not labels.is_shared(), "pickled with the batch"
    labels += 1  # the main process's own, writable copy


def _as_worker(monkeypatch) -> None:
    import torch.utils.data._utils.worker as worker

    monkeypatch.setattr(worker, "_worker_info", worker.WorkerInfo(id=0, num_workers=1, seed=0, dataset=None))


@pytest.mark.parametrize(
    "plan",
    [
        "full groups",  # every image straight into its slot row
        "an empty group",  # its batch is owed: the next group's samples are split in two
        "another size",  # whole parts of several sizes: back to a list
        "left out at the end",  # the last groups emptied on purpose: repaid with the last batch
        "repaid in pairs",  # the same with batches of 2: a repaid row may land in the last's slot
    ],
)
def test_batches_built_row_by_row_in_slots_match_the_plain_ones(monkeypatch, plan):
    from data.batching import batched
    from data.samples import LEFT_OUT
    from data.stream import BadSamples

    size = 2 if plan == "repaid in pairs" else 4
    gone = {"an empty group": range(8, 12), "left out at the end": range(16, 24)}.get(plan, ())
    gone = (20, 21, 23) if plan == "repaid in pairs" else gone

    def samples():
        for i in range(24):
            if i in gone:
                yield None
                continue
            side = 104 if plan == "another size" and i == 13 else 192  # a row is over MIN_BYTES
            yield torch.full((3, side, side), i, dtype=torch.uint8), i, f"k{i}"

    def run(pool):
        bad = BadSamples()
        if plan in ("left out at the end", "repaid in pairs"):
            bad.counts[LEFT_OUT] = len(gone)
        out = []
        for images, targets, keys, _ in batched(samples(), size, bad, pool):
            images = hand_over(images) if pool is not None and not isinstance(images, list) else images
            out.append(([im.clone() for im in images], hand_over(targets).tolist(), keys))
        return out

    _as_worker(monkeypatch)
    plain = run(None)
    pool = SlotPool("rows", slots=8)
    try:
        pooled = run(pool)
    finally:
        batch_pool.release("rows")
    assert len(pooled) == len(plain) == 24 // size
    for (a, ta, ka), (b, tb, kb) in zip(pooled, plain, strict=True):
        assert ka == kb and ta == tb and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert pool.slots, "the slots were used"
