"""`python -m data index`: shards written by webdataset's own ShardWriter become trainable."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data.datamodule import ShardDataModule
from data.errors import UserError
from data.scan import build_index, split_of


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


@pytest.fixture
def foreign(tmp_path):
    """Shards as webdataset's ShardWriter writes them (no index), train and val by file name."""
    for split, n in (("train", 30), ("val", 10)):
        with wds.ShardWriter(str(tmp_path / f"{split}-%06d.tar"), maxcount=12) as sink:
            for i in range(n):
                sink.write({"__key__": f"{split}{i:04d}", "jpg": jpeg(i), "cls": i % 3})
    return tmp_path


def test_index_for_shardwriter_output_then_train_loader_reads_it(foreign):
    index = build_index(str(foreign), classes=["good", "dent", "rust"])
    assert index.classes == ("good", "dent", "rust")
    assert index.split("train").num_samples == 30 and len(index.split("train").shards) == 3
    assert index.split("val").num_samples == 10
    dm = ShardDataModule(index.location, batch_size=5, num_workers=0, image_size=32)
    keys = [k for batch in dm.val_dataloader() for k in batch[2]]
    assert sorted(keys) == [f"val{i:04d}" for i in range(10)]


def test_cli_defaults_class_names_and_refuses_to_overwrite(foreign):
    run = [sys.executable, "-m", "data", "index", str(foreign)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "train 30 in 3 shards, val 10 in 1 shards; 3 classes" in first.stdout
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_too_few_class_names_is_refused(foreign):
    with pytest.raises(UserError, match="--classes names 2 classes, but the shards use labels up to 2"):
        build_index(str(foreign), classes=["a", "b"])


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("train-000001.tar", "train"),
        ("val_0003.tar", "val"),
        ("validation.tar", "val"),
        ("test-1.tar", "test"),
        ("shard-000.tar", "train"),
        ("00001.tar", "train"),
    ],
)
def test_split_from_file_name(name, split):
    assert split_of(name) == split


@pytest.fixture
def json_labelled(tmp_path):
    """img2dataset-style shards: the class lives in KEY.json, as a name, beside other metadata;
    one sample has no class and one a name the others never use."""
    names = ["scratch", "ok", "dent"]
    with wds.ShardWriter(str(tmp_path / "train-%06d.tar"), maxcount=10) as sink:
        for i in range(20):
            meta = {"url": f"line3/cam1/{i}.jpg", "defect": names[i % 3]}
            if i == 7:
                del meta["defect"]
            sink.write({"__key__": f"{i:05d}", "jpg": jpeg(i), "json": meta})
    return tmp_path


def test_labels_from_a_json_field_by_name(json_labelled):
    index = build_index(str(json_labelled), label="json:defect")
    assert index.classes == ("dent", "ok", "scratch")  # names, sorted
    dm = ShardDataModule(index.location, batch_size=4, num_workers=0, image_size=32, val_split="train")
    got = {k: int(c) for batch in dm.val_dataloader() for k, c in zip(batch[2], batch[1])}
    assert len(got) == 19  # the sample without a class is skipped as bad data
    assert got["00000"] == index.classes.index("scratch") and got["00001"] == index.classes.index("ok")


def test_json_labels_follow_the_given_class_order_and_refuse_unknown_names(json_labelled):
    index = build_index(str(json_labelled), classes=["ok", "scratch", "dent"], label="json:defect")
    assert index.classes == ("ok", "scratch", "dent") and index.label == "json:defect"
    with pytest.raises(UserError, match="--classes does not name dent"):
        build_index(str(json_labelled), classes=["ok", "scratch"], label="json:defect", overwrite=True)


def test_cli_label_option(json_labelled):
    run = [sys.executable, "-m", "data", "index", str(json_labelled), "--label", "json:defect"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train 20 in 2 shards; 3 classes" in out.stdout, out.stderr
    wrong = subprocess.run([*run, "--overwrite", "--label", "defect"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "expected 'cls' or 'json:FIELD'" in wrong.stderr
    missing = subprocess.run([*run[:-1], "json:colour", "--overwrite"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no sample has a label ('colour' in KEY.json)" in missing.stderr


@pytest.fixture
def gzipped(tmp_path):
    """Gzipped shards as webdataset's TarWriter writes them (`.tgz`, as its own testdata/sample.tgz,
    and `.tar.gz`), PNG images and no val split."""
    for n, name in enumerate(("part-000000.tgz", "part-000001.tar.gz", "part-000002.tgz")):
        with wds.TarWriter(str(tmp_path / name), compress=True) as sink:
            for i in range(20):
                buf = io.BytesIO()
                Image.fromarray(np.full((24, 24, 3), 40 * (i % 3), np.uint8)).save(buf, "PNG")
                sink.write({"__key__": f"{n}{i:03d}", "png": buf.getvalue(), "cls": i % 3})
    return tmp_path


def test_gzipped_shards_index_read_and_train_without_a_val_split(gzipped, tmp_path):
    assert len(list(wds.WebDataset(str(gzipped / "part-000001.tar.gz"), shardshuffle=False))) == 20
    index = build_index(str(gzipped))
    assert [s.url for s in index.split("train").shards] == [
        "part-000000.tgz",
        "part-000001.tar.gz",
        "part-000002.tgz",
    ]
    assert index.split("train").num_samples == 60 and set(index.splits) == {"train"}
    from data.verify import verify

    assert not [c.problems for c in verify(index, workers=1) if c.problems]
    # No val split: training warns, names the fix, trains and keeps its last epoch.
    run = [sys.executable, "-m", "train", "data=shards", f"data.index={index.location}", "data.image_size=32"]
    run += ["data.batch_size=8", "data.num_workers=0", "model.backbone=test_resnet", "trainer=cpu"]
    run += ["trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has no 'val' split: training without validation" in out.stderr
    assert f"python -m data index {gzipped} --val-fraction 0.1 --overwrite" in out.stderr
    assert list(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))


def test_val_fraction_moves_whole_shards_to_val(foreign):
    (foreign / "val-000000.tar").unlink()  # 30 train samples in shards of 12, 12, 6
    index = build_index(str(foreign), val_fraction=0.2, seed=1)
    train, val = index.split("train"), index.split("val")
    assert train.num_samples + val.num_samples == 30 and len(val.shards) == 1
    assert {s.url for s in train.shards}.isdisjoint(s.url for s in val.shards)
    assert val.num_samples == 6  # the shard nearest 20% of 30
    again = build_index(str(foreign), val_fraction=0.2, seed=1, overwrite=True)
    assert again.sha256 == index.sha256  # the same seed draws the same shards


def test_val_fraction_is_refused_where_it_cannot_apply(foreign, tmp_path):
    with pytest.raises(UserError, match="already have a val split"):
        build_index(str(foreign), val_fraction=0.1)
    one = tmp_path / "one"
    one.mkdir()
    with wds.TarWriter(str(one / "all.tar")) as sink:
        sink.write({"__key__": "a", "jpg": jpeg(0), "cls": 0})
    with pytest.raises(UserError, match="needs at least 2 train shards"):
        build_index(str(one), val_fraction=0.1)
