"""`python -m data write --ray ADDRESS` against a real Ray cluster on 127.0.0.1: the same bytes as
the local writer, a worker killed from outside mid-task, and a rerun after the driver died that
keeps the groups already written. The cluster is test_ray.py's (.ci/run's head, or one started)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """120 images in three classes, JPEG and PNG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("good", "dent", "rust"):
        (root / c).mkdir()
        for i in range(40):
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:03d}.{'png' if i % 5 == 0 else 'jpg'}")
    return root


def write(src: Path, out: Path, *extra: str, env: dict | None = None, wait: bool = True):
    args = [
        sys.executable,
        "-m",
        "data",
        "write",
        "--from-folder",
        str(src),
        str(out),
        "--shard-samples",
        "8",
    ]
    run = subprocess.Popen(
        [*args, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return run
    out_text, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    return out_text + err


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def local(folder, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "ds"
    write(folder, out, "--workers", "2")
    return contents(out)


def _group_tasks() -> list[int]:
    """Ray workers running a write task now (Ray titles a busy worker after its task)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "ray::_group_task" in line]


def test_ray_writer_matches_the_local_writer_with_a_worker_killed_from_outside(
    folder, local, tmp_path, ray_head
):
    address, _, env = ray_head
    out = tmp_path / "ds"
    run = write(folder, out, "--ray", address, env={**env, "SHARDTRAIN_TEST_WRITE_PAUSE_S": "1"}, wait=False)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and run.poll() is None:
        busy = _group_tasks()
        if busy:
            os.kill(busy[0], signal.SIGKILL)  # as an out-of-memory kill or a lost node would
            killed = busy[0]
        time.sleep(0.05)
    out_text, err = run.communicate(timeout=600)
    assert killed is not None, "no write task was seen running"
    assert run.returncode == 0, err[-3000:]
    assert contents(out) == local  # every shard, the image list and dataset.json, byte for byte
    assert not [p for p in out.iterdir() if p.name.startswith(".writing")]  # staging removed
    assert "writing" in err  # the progress bar
    assert "wrote 120 samples" in out_text


def test_a_rerun_after_the_driver_died_keeps_the_groups_written(folder, local, tmp_path, ray_head):
    address, _, env = ray_head
    out = tmp_path / "ds"
    run = write(
        folder, out, "--ray", address, env={**env, "SHARDTRAIN_TEST_WRITE_PAUSE_S": "0.5"}, wait=False
    )
    deadline, records = time.monotonic() + 120, []
    while time.monotonic() < deadline and run.poll() is None:
        records = sorted(out.glob(".writing-ray-*/*.json"))
        if len(records) >= 4:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)  # the driver dies: no cleanup, no index
    run.wait(timeout=60)
    assert len(records) >= 4 and not (out / "dataset.json").exists()
    staging = records[0].parent
    done = [json.loads(r.read_text()) for r in sorted(staging.glob("*.json"))]
    # One finished part is damaged since: the rerun must find it out by its sha256 and write it again.
    damaged = staging / done[0]["parts"][0]["url"]
    raw = bytearray(damaged.read_bytes())
    raw[600] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    kept_inode = {(staging / p["url"]).stat().st_ino: p["sha256"] for r in done[1:] for p in r["parts"]}

    said = write(folder, out, "--ray", address, env=env)
    assert f"kept {len(done) - 1} shard groups" in said
    assert contents(out) == local
    index = json.loads((out / "dataset.json").read_text())
    by_sha = {s["sha256"]: s["url"] for split in index["splits"].values() for s in split["shards"]}
    for inode, sha in kept_inode.items():  # a kept part was renamed into place, not written again
        assert (out / by_sha[sha]).stat().st_ino == inode


def test_ray_tasks_write_to_object_storage(folder, local, bucket, ray_head):
    """Output on an S3-compatible server: tasks upload their parts (each object whole), the
    driver renames them into place; the bytes are the local writer's."""
    import s3fs

    address, _, env = ray_head
    said = write(folder, f"s3://{bucket}/ds", "--ray", address, env={**env, **_s3_env()})
    assert "wrote 120 samples" in said
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/ds"))
    assert names == sorted(local)  # no staging left behind
    assert {n: fs.cat_file(f"{bucket}/ds/{n}") for n in names} == local


def _s3_env() -> dict:
    return {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }


def test_input_a_task_refuses_stops_the_write_with_one_message_and_nothing_left(tmp_path, ray_head):
    address, _, env = ray_head
    src = tmp_path / "images"
    for c in ("good", "dent"):
        (src / c).mkdir(parents=True)
        for i in range(6):  # 16-bit mono, values up to 5000: more than 12 bits hold
            Image.fromarray(np.full((16, 16), 1000 * i, np.uint16)).save(src / c / f"{i}.png")
    out = tmp_path / "ds"
    run = write(src, out, "--ray", address, "--bit-depth", "12", env=env, wait=False)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 2 and err.count("error:") == 1 and "do not fit --bit-depth 12" in err
    assert not (out / "dataset.json").exists() and not list(out.glob(".writing-ray-*"))
