"""The data module over real shards: planned, multi-worker, uint8 batches, bad samples skipped."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import webdataset as wds

from data.batching import batched
from data.datamodule import ShardDataModule
from data.errors import UserError
from data.index import load_index
from data.plan import EpochPlan
from data.samples import Labels
from data.stream import BadSamples, decode_samples, read_planned
from data.transforms import EvalTransform


def all_keys(index_url: str, split: str) -> list[str]:
    index = load_index(index_url)
    urls = [index.shard_url(s) for s in index.split(split).shards]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def collect(loader):
    batches = list(loader)
    keys = [k for batch in batches for k in batch[2]]
    return batches, keys


def test_train_batches_are_uint8_full_and_each_sample_once(tiny_index):
    dm = ShardDataModule(tiny_index, batch_size=16, num_workers=2, image_size=32, shuffle_buffer=8)
    loader = dm.train_dataloader()
    batches, keys = collect(loader)
    assert len(batches) == len(loader) == 180 // 16
    for images, labels, _, _ in batches:
        assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 5
    assert len(keys) == len(set(keys)) == 176
    assert set(keys) <= set(all_keys(tiny_index, "train"))


def test_val_reads_every_sample_exactly_once_in_file_order(tiny_index):
    dm = ShardDataModule(tiny_index, batch_size=16, num_workers=2, image_size=32)
    _, keys = collect(dm.val_dataloader())
    assert sorted(keys) == sorted(all_keys(tiny_index, "val")) and len(keys) == 60
    _, again = collect(dm.val_dataloader())
    assert again == keys


def test_labels_travel_with_their_images(tiny_index):
    truth = {}
    index = load_index(tiny_index)
    urls = [index.shard_url(s) for s in index.split("val").shards]
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        truth[s["__key__"]] = int(s["cls"])
    dm = ShardDataModule(tiny_index, batch_size=7, num_workers=0, image_size=32)
    for _, labels, keys, _ in dm.val_dataloader():
        assert labels.tolist() == [truth[k] for k in keys]


def position(dm: ShardDataModule, batches: int, **saved) -> dict:
    """What a checkpoint of `dm`, `batches` into epoch 0, holds (`saved` overrides the layout)."""
    return {"epoch": 0, "batches": batches, "offset": 0, "parts": [], **dm._plan_inputs(), **saved}


def test_resume_continues_the_epoch_exactly(tiny_index):
    dm = ShardDataModule(tiny_index, batch_size=10, num_workers=2, image_size=32)
    loader = dm.train_dataloader()
    _, epoch0 = collect(loader)
    dm.load_state_dict(position(dm, 5))
    assert len(loader) == 18  # Lightning counts on from batch 5
    _, rest = collect(loader)  # the first iteration after a restore starts at batch 5
    assert rest == epoch0[50:]
    _, again = collect(loader)
    assert again == epoch0  # later iterations start at the top again


@pytest.mark.parametrize(
    ("before", "after"),
    [({"num_workers": 2}, {}), ({"batch_size": 7, "shuffle_buffer": 3}, {}), ({}, {"num_workers": 0})],
)
def test_resume_under_another_layout_trains_the_rest_of_the_epoch_once(tiny_index, before, after):
    """Elastic: stop 4 batches into an epoch under one layout, resume under another."""
    kw = {"batch_size": 10, "num_workers": 1, "image_size": 32, "shuffle_buffer": 16}
    first = ShardDataModule(tiny_index, **{**kw, **before})
    batches, _ = collect(first.train_dataloader())
    trained = [k for b in batches[:4] for k in b[2]]

    second = ShardDataModule(tiny_index, **{**kw, **after})
    second.load_state_dict(position(first, 4))
    loader = second.train_dataloader()
    length = len(loader)
    _, rest = collect(loader)
    assert length == 4 + len(rest) // 10  # Lightning counts on from batch 4
    both = trained + rest
    assert len(both) == len(set(both))
    assert 180 - len(both) < 10  # only the tail under one batch is left out
    _, later = collect(loader)
    assert len(later) == 180 // 10 * 10  # the next epoch is whole again


def test_mid_epoch_resume_with_another_seed_is_refused(tiny_index):
    dm = ShardDataModule(tiny_index, batch_size=10, num_workers=1, image_size=32)
    dm.load_state_dict(position(dm, 5, seed=3))
    with pytest.raises(UserError, match=r"changed seed \(3 -> 0\)"):
        list(dm.train_dataloader())


def test_corrupt_and_unlabelled_samples_are_skipped_and_counted(tmp_path, tiny_index):
    index = load_index(tiny_index)
    good = index.shard_url(index.split("val").shards[0])
    bad_shard = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad_shard, "w") as dst:
        labels = 0
        for n, member in enumerate(src.getmembers()):
            data = src.extractfile(member).read()
            if n == 0:  # first image: garbage bytes
                data = b"\xff\xd8 this is not a jpeg"
            if member.name.endswith(".cls"):
                labels += 1
                if labels == 2:  # the second sample's label
                    data = b"three"
                if labels == 3:  # the third sample's label: no such class
                    data = b"5"
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    plan = EpochPlan((50,), batch_size=50, shuffle=False, drop_last=False)
    bad = BadSamples()
    samples = read_planned(plan.worker_samples(0), [str(bad_shard)], bad)
    out = list(decode_samples(samples, EvalTransform(32), Labels(tuple("abcde")), bad))
    assert len(out) == 50  # one entry per plan position; None where a sample cannot train
    assert sum(x is not None for x in out) == 47
    assert bad.counts == {"undecodable image": 1, "missing or non-integer label": 1, "label out of range": 1}


def test_truncated_shard_loses_only_its_tail(tmp_path, tiny_index):
    index = load_index(tiny_index)
    with open(index.shard_url(index.split("val").shards[0]), "rb") as f:
        raw = f.read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: len(raw) // 2])
    bad = BadSamples()
    plan = EpochPlan((50,), batch_size=50, shuffle=False, drop_last=False)
    got = [s for s in read_planned(plan.worker_samples(0), [str(cut)], bad) if s is not None]
    assert 10 < len(got) < 50
    assert sum(bad.counts.values()) == 50 - len(got)  # every lost sample is counted


def test_missing_shard_is_an_error_naming_it(tmp_path):
    plan = EpochPlan((3,), batch_size=3, shuffle=False, drop_last=False)
    with pytest.raises(UserError, match=r"shard .*gone.tar is listed in the index but missing"):
        list(read_planned(plan.worker_samples(0), [str(tmp_path / "gone.tar")], BadSamples()))


def test_missing_shard_skipped_on_request_counts_its_samples(tiny_index, tmp_path):
    index = load_index(tiny_index)
    urls = [index.shard_url(s) for s in index.split("val").shards]
    plan = EpochPlan((50, 10), batch_size=5, shuffle=False, drop_last=False)
    bad = BadSamples()
    got = list(read_planned(plan.worker_samples(0), [str(tmp_path / "gone.tar"), urls[1]], bad, "skip"))
    assert sum(s is not None for s in got) == 10 and len(got) == 60
    assert bad.counts == {"missing shard": 50}
    assert set(bad.take()["shards"]) == {str(tmp_path / "gone.tar")}


def test_turning_the_audit_on_at_a_resume_is_refused(tiny_index, tmp_path):
    dm = ShardDataModule(tiny_index, batch_size=10, num_workers=0, audit=True, audit_dir=str(tmp_path / "a"))
    with pytest.raises(UserError, match="the run being resumed kept no audit"):
        dm.load_state_dict({"epoch": 0, "batches": 3, "global_step": 3, "audit_dir": None})


def good(n: int):
    return (torch.zeros(3, 2, 2, dtype=torch.uint8), 0, f"k{n}")


@pytest.mark.parametrize(
    ("pattern", "sizes"),
    [
        ("gggg gggg gggg", [4, 4, 4]),
        ("gbgg gggg bbgg", [3, 4, 2]),  # bad samples leave their batch short
        ("bbbb gggg gggg", [2, 2, 4]),  # an all-bad group is paid by splitting the next
        ("gggg bbbb bbbb ggg", [4, 1, 1, 1]),  # two owed plus a partial last group (eval)
    ],
)
def test_batches_follow_plan_groups_so_counts_never_change(pattern, sizes):
    items = [good(i) if c == "g" else None for i, c in enumerate(pattern.replace(" ", ""))]
    batches = list(batched(items, 4, BadSamples()))
    assert [len(b[2]) for b in batches] == sizes
    keys = [k for b in batches for k in b[2]]
    assert keys == [f"k{i}" for i, c in enumerate(pattern.replace(" ", "")) if c == "g"]  # order kept


def test_a_worker_that_cannot_fill_its_planned_batches_says_so():
    with pytest.raises(UserError, match=r"3 planned batch\(es\) of this loader worker lost every sample"):
        list(batched([good(0), None, None, None, None, None, None, None], 2, BadSamples()))
