"""Data sets on object storage, against a real S3-compatible server (moto) on 127.0.0.1.

.ci/run starts one and names it in SHARDTRAIN_TEST_S3_ENDPOINT; run alone, the fixture starts
its own on a free local port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from data import sources
from data.index import load_index
from data.write import write_dataset
from train.run import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    endpoint = os.environ.get("SHARDTRAIN_TEST_S3_ENDPOINT")
    server = None
    if not endpoint:
        port = _free_port()
        moto = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
        server = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if server:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    import s3fs

    name = f"shardtrain-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name


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
