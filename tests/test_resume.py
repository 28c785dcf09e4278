"""Kill a run mid-epoch, resume it, and prove from the audit that every sample of every epoch
trained exactly once, in the same order as a run that was never interrupted."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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
        proc.output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, proc.output[-3000:]
    return proc


def audit(run_dir: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted((run_dir / "audit").glob("epoch*.txt"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_index) -> dict[str, list[str]]:
    """The audit of a run of 3 epochs that was never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    train_cli(root, tiny_index, "name=reference", "trainer.max_epochs=3")
    (ref_dir,) = (root / "outputs" / "reference").iterdir()
    return audit(ref_dir)


def test_killed_mid_epoch_then_resumed_trains_each_sample_exactly_once(tmp_path, tiny_index, reference):
    expected = reference
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
        "checkpoint.every_n_steps=4",
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

    train_cli(
        tmp_path,
        tiny_index,
        "name=crashy",
        "trainer.max_epochs=3",
        "checkpoint.every_n_steps=4",
        "resume=auto",
    )
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


def wait_for_audit(proc: subprocess.Popen, directory: Path, lines: int) -> None:
    """Until the run's audit lists `lines` training samples (it is flushed per batch)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(len(p.read_text().splitlines()) for p in directory.glob("audit/epoch*.txt")) >= lines:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before its audit reached {lines} samples")


@pytest.mark.slow
def test_sigterm_at_a_random_step_then_the_same_command_continues_exactly(tmp_path, tiny_index, reference):
    """A requeued job: the same command, a fixed run directory and resume=auto. SIGTERM from
    outside at a random moment of the first two epochs stops it with a checkpoint at the next
    step and exit 143; the same command then trains every sample exactly once, as the
    uninterrupted reference did."""
    at = random.Random().randrange(20, 2 * 176)
    job = tmp_path / "job"
    same = ("name=requeued", "trainer.max_epochs=3", f"hydra.run.dir={job}", "resume=auto")
    victim = train_cli(tmp_path, tiny_index, *same, wait=False)
    wait_for_audit(victim, job, at)
    victim.send_signal(signal.SIGTERM)
    out, _ = victim.communicate(timeout=60)
    assert victim.returncode == 143, f"SIGTERM after {at} samples:\n{out[-3000:]}"
    assert "resume=auto: no checkpoint in" in out and "starting fresh" in out
    stopped = next(line for line in out.splitlines() if "stopped by SIGTERM" in line)
    assert f"{job}/checkpoints/last.ckpt" in stopped and "resume=auto" in stopped
    assert "Traceback" not in out
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] >= 1 and ckpt["ShardDataModule"]["samples"] % 16 == 0

    again = train_cli(tmp_path, tiny_index, *same)
    assert f"resume=auto: continuing from {job}/checkpoints/last.ckpt" in again.output
    assert audit(job) == reference, f"SIGTERM after {at} samples"


@pytest.mark.slow
def test_sigusr1_to_the_first_ddp_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_index):
    """SLURM's --signal reaches the first process; the other rank learns of it at the next step,
    both write the same position, and the run resumes from it with each sample once."""
    ddp = (
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "name=slurm",
    )
    victim = train_cli(tmp_path, tiny_index, *ddp, wait=False)
    (run_dir,) = _wait_for_run(tmp_path / "outputs" / "slurm")
    wait_for_audit(victim, run_dir, 48)
    victim.send_signal(signal.SIGUSR1)  # rank 0 only: Lightning started rank 1 as its child
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signal.SIGUSR1, out[-3000:]
    position = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["ShardDataModule"]
    assert position["world_size"] == 2 and position["batches"] >= 1

    train_cli(tmp_path, tiny_index, *ddp, "resume=auto")
    resumed = next(d for d in (tmp_path / "outputs" / "slurm").iterdir() if d != run_dir)
    files = audit(resumed)
    for epoch in range(2):
        keys = files[f"epoch{epoch:03d}-rank000.txt"] + files[f"epoch{epoch:03d}-rank001.txt"]
        assert len(keys) == len(set(keys)) == 2 * 5 * 16  # 180 samples: 5 batches of 16 per rank


def _wait_for_run(runs: Path) -> list[Path]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = list(runs.glob("*")) if runs.exists() else []
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no run directory appeared under {runs}")


@pytest.mark.slow
def test_a_truncated_last_ckpt_falls_back_to_the_previous_good_one(tmp_path, tiny_index):
    first = train_cli(tmp_path, tiny_index, "name=torn", "trainer.max_epochs=1")
    (run_dir,) = (tmp_path / "outputs" / "torn").iterdir()
    last, (epoch_ckpt,) = run_dir / "checkpoints" / "last.ckpt", (run_dir / "checkpoints").glob("epoch*.ckpt")
    assert first.returncode == 0
    last.write_bytes(last.read_bytes()[:100_000])  # what a crash mid-write leaves with a plain save

    out = train_cli(tmp_path, tiny_index, "name=torn", "trainer.max_epochs=2", "resume=auto").output
    assert f"passing over {last}: checkpoint {last} is unreadable, truncated or corrupt" in out
    assert f"resume=auto: continuing from {epoch_ckpt}" in out

    named = subprocess.run(
        [sys.executable, "-m", "train", "data=shards", f"data.index={tiny_index}", f"resume={last}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = named.stdout + named.stderr
    assert named.returncode == 2 and "Traceback" not in output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"checkpoint {last} is unreadable, truncated or corrupt" in errors[0]


def _run(root: Path, name: str, mode: str, overrides: list[str], ckpt: str, when: float) -> Path:
    """A run directory as Hydra lays it out, with one checkpoint copied in at time `when`."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  mode: {mode}\n")
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "checkpoints").mkdir()
    target = run / "checkpoints" / "last.ckpt"
    target.write_bytes(Path(ckpt).read_bytes())
    os.utime(target, (when, when))
    return target


def test_resume_auto_continues_its_own_job_and_never_another_sweep_point(tmp_path, trained, monkeypatch):
    from train import resume

    runs = tmp_path / "outputs" / "sweep"
    single = _run(runs, "2026-01-01_00-00-00", "RUN", ["lr=1"], trained, 100)
    job0 = _run(runs, "multirun-1/0", "MULTIRUN", ["lr=1", "resume=auto"], trained, 200)
    job1 = _run(runs, "multirun-1/1", "MULTIRUN", ["lr=3"], trained, 300)  # the newest
    (runs / "multirun-1" / "multirun.yaml").write_text("hydra: {}\n")  # Hydra writes one beside the jobs
    own = tmp_path / "fixed" / "checkpoints"

    # A plain run (no Hydra around it, or mode RUN): the newest single run.
    assert resume.find_resume("auto", str(own), str(runs))[0] == str(single)
    # A multirun job continues the earlier job of its own sweep point: the same lr, the setting
    # that sweep varied, whatever else was added since.
    monkeypatch.setattr(resume, "_job", lambda: {"lr": "1", "trainer.max_epochs": "5"})
    assert resume.find_resume("auto", str(own), str(runs))[0] == str(job0)
    monkeypatch.setattr(resume, "_job", lambda: {"lr": "3"})
    assert resume.find_resume("auto", str(own), str(runs))[0] == str(job1)
    monkeypatch.setattr(resume, "_job", lambda: {"lr": "9"})
    assert resume.find_resume("auto", str(own), str(runs)) == (None, {})
    # Its own directory (a fixed hydra.run.dir) comes before anything else.
    own.mkdir(parents=True)
    (own / "last.ckpt").write_bytes(Path(trained).read_bytes())
    assert resume.find_resume("auto", str(own), str(runs))[0] == str(own / "last.ckpt")


def test_a_resumed_run_keeps_the_best_checkpoints_of_the_run_it_continues(tmp_path):
    from train.resume import BestCheckpoints

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    for name in ("epoch003.ckpt", "epoch004.ckpt"):
        (old / name).write_bytes(name.encode())
    state = {
        "dirpath": str(old),
        "best_k_models": {
            str(old / "epoch003.ckpt"): torch.tensor(0.9),
            str(old / "epoch004.ckpt"): torch.tensor(0.8),
        },
        "best_model_path": str(old / "epoch003.ckpt"),
        "best_model_score": torch.tensor(0.9),
        "kth_best_model_path": str(old / "epoch004.ckpt"),
        "kth_value": torch.tensor(0.8),
        "last_model_path": str(old / "last.ckpt"),
        "current_score": torch.tensor(0.8),
    }
    callback = BestCheckpoints(dirpath=str(new), monitor="val/acc", mode="max", save_top_k=2)
    callback.load_state_dict(state)
    assert sorted(os.listdir(new)) == ["epoch003.ckpt", "epoch004.ckpt"]
    assert (new / "epoch003.ckpt").read_bytes() == b"epoch003.ckpt"
    assert set(callback.best_k_models) == {str(new / "epoch003.ckpt"), str(new / "epoch004.ckpt")}
    assert callback.best_model_path == str(new / "epoch003.ckpt")
    assert callback.kth_best_model_path == str(new / "epoch004.ckpt")
    assert float(callback.kth_value) == pytest.approx(0.8)
    assert sorted(os.listdir(old)) == ["epoch003.ckpt", "epoch004.ckpt"]  # the old run keeps its files


@pytest.mark.slow
def test_a_sweep_run_again_with_resume_auto_continues_each_point_from_its_own_job(tmp_path, train_command):
    def multirun(*overrides: str) -> list[str]:
        command = train_command(*overrides)
        return [*command[:3], "--multirun", *command[3:]]  # Hydra's flags go before the overrides

    sweep = ("name=sweep", "resume=auto", "logger=none", "optim.optimizer.lr=1e-3,3e-3")
    first = subprocess.run(multirun(*sweep), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    (old,) = (tmp_path / "outputs" / "sweep").glob("multirun-*")
    # One more epoch; the sweep's points listed the other way round, so job numbers swap.
    more = (*sweep[:-1], "trainer.max_epochs=2", "optim.optimizer.lr=3e-3,1e-3")
    again = subprocess.run(multirun(*more), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    chosen = re.findall(r"resume=auto: continuing from (\S+)", log)
    assert chosen == [f"{old}/1/checkpoints/last.ckpt", f"{old}/0/checkpoints/last.ckpt"]


def test_resume_auto_passes_over_a_torn_checkpoint_and_stops_when_none_loads(tmp_path, trained, caplog):
    from data.errors import UserError
    from train import resume

    runs = tmp_path / "outputs" / "torn"
    last = _run(runs, "2026-01-02_00-00-00", "RUN", [], trained, 300)
    older = last.parent / "epoch000.ckpt"
    older.write_bytes(Path(trained).read_bytes())
    os.utime(older, (200, 200))
    last.write_bytes(last.read_bytes()[:10_000])
    with caplog.at_level("WARNING", logger="train"):
        assert resume.find_resume("auto", str(tmp_path / "new"), str(runs))[0] == str(older)
    assert f"passing over {last}: checkpoint {last} is unreadable, truncated or corrupt" in caplog.text
    older.write_bytes(b"not a checkpoint")
    with pytest.raises(
        UserError, match=r"resume=auto: no checkpoint of this run loads \(.*last.ckpt, .*epoch000"
    ):
        resume.find_resume("auto", str(tmp_path / "new"), str(runs))


def test_the_epoch_end_overwrites_the_mid_epoch_last_ckpt(make_cfg):
    """every_n_steps writes last.ckpt mid-epoch; the epoch's end then writes the same file, not a
    last-v1.ckpt beside it that would leave resume=auto a few steps behind."""
    from train.run import train

    cfg = make_cfg("checkpoint.every_n_steps=2", "trainer.max_epochs=2")
    result = train(cfg)
    checkpoints = os.path.join(cfg.paths.output_dir, "checkpoints")
    assert sorted(n for n in os.listdir(checkpoints) if n.startswith("last")) == ["last.ckpt"]
    last = torch.load(os.path.join(checkpoints, "last.ckpt"), map_location="cpu", weights_only=True)
    assert last["global_step"] == result["global_step"] == 2 * (180 // 16)
    assert result["last_checkpoint"] == os.path.join(checkpoints, "last.ckpt")
