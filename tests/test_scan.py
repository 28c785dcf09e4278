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
