"""Kill a run mid-epoch, resume it, and prove from the audit that every sample of every epoch
trained exactly once, in the same order as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch


def train_cli(tmp_path: Path, index: str, *overrides: str, wait: bool = True, env: dict | None = None):
    args = [
        sys.executable,
        "-m",
        "train",
        "data=shards",
        f"data.index={index}",
        "data.image_size=32",
        "data.batch_size=16",
        "data.num_workers=1",
        "data.shuffle_buffer=16",
        "data.audit=true",
        "model.backbone=test_resnet",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "checkpoint.every_n_steps=4",
        *overrides,
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    return proc


def audit(run_dir: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted((run_dir / "audit").glob("epoch*.txt"))}


def test_killed_mid_epoch_then_resumed_trains_each_sample_exactly_once(tmp_path, tiny_index):
    reference = train_cli(tmp_path, tiny_index, "name=reference", "trainer.max_epochs=3")
    assert reference.returncode == 0
    (ref_dir,) = (tmp_path / "outputs" / "reference").iterdir()
    expected = audit(ref_dir)
    assert list(expected) == [f"epoch{e:03d}-rank000.txt" for e in range(3)]
    assert all(len(keys) == len(set(keys)) == 176 for keys in expected.values())  # 11 batches of 16
    orders = list(expected.values())  # loader workers persist, and still see each epoch's plan
    assert orders[0] != orders[1] != orders[2] and set(orders[0]) != set(orders[1])

    # Killed (SIGKILL, no cleanup) as step 14 starts: epoch 1, batch 3, after the step-12
    # checkpoint, with steps 13 and 14's batches already fetched and audited.
    victim = train_cli(
        tmp_path,
        tiny_index,
        "name=crashy",
        "trainer.max_epochs=3",
        wait=False,
        env={"SHARDTRAIN_KILL_AT_STEP": "14"},
    )
    out, _ = victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL, out[-2000:]
    (crashed_dir,) = (tmp_path / "outputs" / "crashy").iterdir()
    ckpt = torch.load(crashed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    position = ckpt["ShardDataModule"]
    assert (position["epoch"], position["batches"], ckpt["global_step"]) == (1, 1, 12)
    assert len(audit(crashed_dir)["epoch001-rank000.txt"]) > 16  # more than the checkpoint holds

    train_cli(tmp_path, tiny_index, "name=crashy", "trainer.max_epochs=3", "resume=auto")
    resumed_dir = next(d for d in (tmp_path / "outputs" / "crashy").iterdir() if d != crashed_dir)
    assert audit(resumed_dir) == expected


def test_ddp_run_killed_mid_epoch_resumes_on_one_process_exactly_once(tmp_path, tiny_index):
    """Elastic: 2 ranks × 1 worker lose rank 1 (SIGKILL, so Lightning ends the group) after the
    step-2 checkpoint; the run resumes on 1 rank × 2 workers, and the audit of the interrupted
    epoch, old ranks and new together, lists every sample at most once."""
    ddp = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "checkpoint.every_n_steps=2")
    victim = train_cli(
        tmp_path,
        tiny_index,
        "name=elastic",
        "trainer.max_epochs=2",
        *ddp,
        wait=False,
        env={"SHARDTRAIN_KILL_AT_STEP": "3", "SHARDTRAIN_KILL_RANK": "1"},
    )
    out, _ = victim.communicate(timeout=300)
    assert victim.returncode != 0, out[-2000:]
    (crashed_dir,) = (tmp_path / "outputs" / "elastic").iterdir()
    position = torch.load(crashed_dir / "checkpoints" / "last.ckpt", weights_only=True)["ShardDataModule"]
    assert (position["epoch"], position["batches"], position["world_size"]) == (0, 2, 2)

    resume = ("trainer.max_epochs=2", "data.num_workers=2", "resume=auto")
    train_cli(tmp_path, tiny_index, "name=elastic", *resume)
    resumed_dir = next(d for d in (tmp_path / "outputs" / "elastic").iterdir() if d != crashed_dir)
    files = audit(resumed_dir)
    assert sorted(files) == ["epoch000-rank000.txt", "epoch000-rank001.txt", "epoch001-rank000.txt"]
    assert len(files["epoch000-rank001.txt"]) == 2 * 16  # rank 1's part, cut back to the checkpoint
    epoch0 = files["epoch000-rank000.txt"] + files["epoch000-rank001.txt"]
    assert len(epoch0) == len(set(epoch0))
    assert 180 - len(epoch0) < 16  # 2 × 2 × 16 trained on 2 ranks, then 7 batches of the rest
    assert len(files["epoch001-rank000.txt"]) == len(set(files["epoch001-rank000.txt"])) == 176
