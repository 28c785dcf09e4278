"""launcher=ray against a real Ray cluster on 127.0.0.1: 2 workers end to end with a worker
killed mid-epoch and recovered, retries running out, `ray job submit`, and parity with the
local launcher. .ci/run starts the head and names it in SHARDTRAIN_TEST_RAY_ADDRESS and
SHARDTRAIN_TEST_RAY_DASHBOARD; run alone, the fixture starts one. About a minute each."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)


def cli(tmp_path: Path, index: str, *overrides: str, env: dict, timeout: int = 600):
    args = [
        sys.executable, "-m", "train", "data=shards", f"data.index={index}", "data.image_size=32",
        "data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=16", "model.backbone=test_resnet",
        "trainer=cpu", "trainer.enable_progress_bar=false", *overrides,
    ]  # fmt: skip
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def audit(run_dir: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().split() for p in sorted((run_dir / "audit").glob("epoch*.txt"))}


def test_two_workers_recover_from_a_killed_worker_and_train_each_sample_once(tmp_path, tiny_index, ray_head):
    address, _, env = ray_head
    env = {
        **env,
        "SHARDTRAIN_KILL_AT_STEP": "7",
        "SHARDTRAIN_KILL_RANK": "1",
    }  # epoch 1, after step 6's checkpoint
    out = cli(
        tmp_path, tiny_index, "name=ray2", "trainer.max_epochs=2", "data.audit=true", "logger=csv",
        "checkpoint.every_n_steps=2", "launcher=ray", "launcher.num_workers=2", "launcher.max_failures=1",
        f"launcher.address={address}", env=env,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "ray: 2 workers finished at step 10" in log  # 2 epochs x 5 steps, step 7 killed and redone
    assert re.search(r"best checkpoint \S+/checkpoints/epoch00\d.ckpt", log)
    (run_dir,) = (tmp_path / "outputs" / "ray2").iterdir()
    files = audit(run_dir)
    assert sorted(files) == [f"epoch00{e}-rank00{r}.txt" for e in range(2) for r in range(2)]
    for epoch in range(2):
        ranks = [files[f"epoch00{epoch}-rank00{r}.txt"] for r in range(2)]
        assert [len(r) for r in ranks] == [80, 80]  # 5 batches of 16 each: cut back, then redone
        assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0])) == 80
    # Rank zero logs alone: one CSV version per attempt (CSV has no run id to continue; MLflow and
    # wandb continue theirs from the checkpoint, tests/test_tracking.py).
    assert len(list(run_dir.glob("csv/*/metrics.csv"))) == 2
    assert list((tmp_path / "outputs" / "ray" / "ray2").glob("checkpoint_*/checkpoint.ckpt"))

    # The same command again (as after the driver itself died), with one more epoch: it goes on
    # from the newest checkpoint under storage_path rather than starting over.
    again = cli(
        tmp_path, tiny_index, "name=ray2", "trainer.max_epochs=3", "logger=none", "launcher=ray",
        "launcher.num_workers=2", f"launcher.address={address}", env=ray_head[2],
    )  # fmt: skip
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert re.search(r"Restored all states from the checkpoint at \S+/ray/ray2/checkpoint_", log)
    assert "ray: 2 workers finished at step 15" in log


def test_failures_beyond_max_failures_stop_with_the_original_error(tmp_path, tiny_index, ray_head):
    address, _, env = ray_head
    env = {**env, "SHARDTRAIN_RAISE_AT_STEP": "2", "SHARDTRAIN_FAULT_ALWAYS": "1"}
    out = cli(
        tmp_path, tiny_index, "name=doomed", "trainer.max_epochs=1", "logger=none",
        "checkpoint.every_n_steps=1", "launcher=ray", "launcher.num_workers=2", "launcher.max_failures=1",
        f"launcher.address={address}", env=env,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 2, log[-4000:]
    assert "error: training on Ray failed after 1 restart(s)" in log
    assert "injected failure at step 2 on rank 0" in log


def test_ray_job_submit_runs_the_same_command(tmp_path, tiny_index, ray_head):
    _, dashboard, env = ray_head
    out = subprocess.run(
        [str(REPO / "scripts" / "submit_ray_job.sh"), "name=job", f"data.index={tiny_index}", "data=shards",
         "data.image_size=32", "data.batch_size=16", "data.num_workers=1", "model.backbone=test_resnet",
         "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
         f"paths.log_dir={tmp_path}/outputs", "launcher.num_workers=2"],
        env={**env, "RAY_ADDRESS": dashboard}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "ray: 2 workers finished at step 5" in log and "succeeded" in log
    assert list((tmp_path / "outputs" / "job").glob("*/checkpoints/last.ckpt"))


def test_one_ray_worker_matches_the_local_launcher(tmp_path, tiny_index, ray_head):
    address, _, env = ray_head
    common = ("trainer.max_epochs=2", "logger=none", "data.num_workers=1")
    local = cli(tmp_path, tiny_index, "name=local", *common, env=env)
    ray = cli(
        tmp_path, tiny_index, "name=onray", *common, "launcher=ray", "launcher.num_workers=1",
        f"launcher.address={address}", env=env,
    )  # fmt: skip
    assert local.returncode == 0 and ray.returncode == 0, (local.stderr + ray.stdout + ray.stderr)[-4000:]
    accuracy = r"final validation accuracy: ([0-9.]+) .*macro F1 ([0-9.]+)"
    assert (
        re.search(accuracy, local.stdout + local.stderr).groups()
        == re.search(accuracy, ray.stdout + ray.stderr).groups()
    )


def test_sigterm_to_the_driver_stops_the_workers_with_their_position_reported(tmp_path, tiny_index, ray_head):
    """`ray job stop` or a pod's SIGTERM reaches the driver: the workers stop at a step, Ray keeps
    that position, the driver exits 143, and the same command continues each sample once."""
    address, _, env = ray_head
    same = (
        "name=preempted", "trainer.max_epochs=2", "data.audit=true", "logger=none", "launcher=ray",
        "launcher.num_workers=2", f"launcher.address={address}",
    )  # fmt: skip
    args = [
        sys.executable, "-m", "train", "data=shards", f"data.index={tiny_index}", "data.image_size=32",
        "data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=16", "model.backbone=test_resnet",
        "trainer=cpu", "trainer.enable_progress_bar=false", *same,
    ]  # fmt: skip
    driver = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if (
            sum(len(p.read_text().split()) for p in tmp_path.glob("outputs/preempted/*/audit/epoch*.txt"))
            >= 48
        ):
            break
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    log, _ = driver.communicate(timeout=120)
    assert driver.returncode == 143, log[-4000:]
    assert re.search(r"stopped by SIGTERM at step \d+: Ray keeps the exact position", log)
    (first_dir,) = (tmp_path / "outputs" / "preempted").iterdir()

    again = cli(tmp_path, tiny_index, *same, env=env)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert re.search(r"Restored all states from the checkpoint at \S+/ray/preempted/checkpoint_", log)
    assert "ray: 2 workers finished at step 10" in log
    resumed = next(d for d in (tmp_path / "outputs" / "preempted").iterdir() if d != first_dir)
    files = audit(resumed)
    for epoch in range(2):
        ranks = [files[f"epoch00{epoch}-rank00{r}.txt"] for r in range(2)]
        assert [len(r) for r in ranks] == [80, 80]
        assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0])) == 80
