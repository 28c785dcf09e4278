"""Data sets on object storage, against a real S3-compatible server (moto) on 127.0.0.1.

.ci/run starts one and names it in SHARDTRAIN_TEST_S3_ENDPOINT; run alone, the fixture starts
its own on a free local port.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data import sources
from data.index import load_index
from data.write import write_dataset
from train.run import train


def test_write_straight_to_s3_and_read_back(bucket):
    items = sources.from_synthetic(60, 0, 32)
    report = write_dataset(items, f"s3://{bucket}/ds", val_fraction=0.25, shard_samples=20, workers=1)
    assert report.index.location == f"s3://{bucket}/ds/dataset.json"
    index = load_index(f"s3://{bucket}/ds")
    assert index.sha256 == report.index.sha256
    assert index.split("train").num_samples == 45 and len(index.split("train").shards) == 3
    out = subprocess.run(
        [sys.executable, "-m", "data", "verify", f"s3://{bucket}/ds", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: 4 shards, 60 samples")


def test_train_from_an_s3_data_set(bucket, make_cfg, tiny_index):
    import s3fs

    s3fs.S3FileSystem().put(os.path.dirname(tiny_index), f"{bucket}/tiny", recursive=True)
    result = train(make_cfg(f"data.index=s3://{bucket}/tiny/dataset.json", "data.num_workers=2"))
    assert sum(map(sum, result["confusion"])) == 60  # every val sample streamed from S3, once
    assert result["global_step"] == 180 // 16


def test_missing_bucket_is_one_message(s3_endpoint, make_cfg):
    from data.errors import UserError
    from train.run import build

    with pytest.raises(UserError, match=r"no dataset index at s3://no-such-bucket-here/ds/dataset\.json"):
        build(make_cfg("data.index=s3://no-such-bucket-here/ds"))


def test_manifest_and_images_on_s3_write_the_same_shards_as_local_files(bucket, tmp_path):
    """Sources on object storage: a manifest in the bucket naming images beside it."""
    import s3fs

    from tests.test_write import make_folder

    src = make_folder(tmp_path / "images", per_class=6)
    rows = ["path,label,line"] + [f"{p.relative_to(src)},{p.parent.name},3" for p in sorted(src.rglob("*.*"))]
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    s3fs.S3FileSystem().put(str(src), f"{bucket}/raw", recursive=True)
    remote = write_dataset(
        sources.from_manifest(f"s3://{bucket}/raw/labels.csv"), str(tmp_path / "a"), workers=1
    )
    here = write_dataset(sources.from_manifest(str(src / "labels.csv")), str(tmp_path / "b"), workers=1)
    assert remote.written == here.written == 12
    assert [s.sha256 for s in remote.index.split("train").shards] == [
        s.sha256 for s in here.index.split("train").shards
    ]
