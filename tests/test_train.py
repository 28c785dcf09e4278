"""End to end through `train(cfg)` on real shards: metrics, checkpoints, resume, trackers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from train.checkpoint import KEY
from train.run import train


def test_shrunken_quickstart_trains_checkpoints_and_reports(make_cfg, tmp_path):
    result = train(make_cfg("trainer.max_epochs=2"))
    assert 0.0 <= result["metrics"]["val/acc"] <= 1.0
    assert {"val/f1", "val/loss", "val/recall/ok"} <= set(result["metrics"])
    assert result["global_step"] == 2 * (180 // 16)
    assert os.path.isfile(result["best_checkpoint"]) and result["last_checkpoint"].endswith("last.ckpt")
    assert sum(map(sum, result["confusion"])) == 60  # every val sample counted once

    ckpt = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    meta = ckpt[KEY]
    assert meta["model"]["backbone"] == "test_resnet" and meta["model"]["image_size"] == 32
    assert meta["model"]["classes"] == ["ok", "crack", "scratch", "spot", "stain"]  # good first: masks
    lineage = meta["lineage"]
    assert len(lineage["dataset"]["sha256"]) == 64 and lineage["config"]["data"]["batch_size"] == 16
    assert lineage["code_version"] and "torch" in lineage["packages"]
    assert ckpt["ShardDataModule"]["epoch"] == 1


def test_checkpoint_loads_in_a_fresh_process_and_predicts(make_cfg, tmp_path, tiny_index):
    result = train(make_cfg())
    image = tmp_path / "sample.jpg"
    import webdataset as wds

    from data.index import load_index

    index = load_index(tiny_index)
    sample = next(
        iter(
            wds.WebDataset(
                index.shard_url(index.split("val").shards[0]), shardshuffle=False, empty_check=False
            )
        )
    )
    image.write_bytes(sample["jpg"])
    script = textwrap.dedent(f"""
        import json, torch
        from PIL import Image
        from train import load_model
        m = load_model({result["best_checkpoint"]!r})
        assert not m.training and next(m.parameters()).device.type == "cpu"
        one = m.predict({str(image)!r})
        blank = torch.zeros(3, 40, 40, dtype=torch.uint8)
        many = m.predict([{str(image)!r}, Image.open({str(image)!r}), blank])
        print(json.dumps({{"one": one, "many": many}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    one = got["one"]
    assert one["label"] in one["probs"] and abs(sum(one["probs"].values()) - 1) < 1e-5
    assert one["score"] == max(one["probs"].values())
    for other in got["many"][:2]:  # a path and a PIL image get the same preprocessing
        assert other["label"] == one["label"]
        assert all(abs(other["probs"][c] - p) < 1e-5 for c, p in one["probs"].items())
    assert len(got["many"]) == 3


def test_resume_auto_continues_steps_and_the_mlflow_run(make_cfg, tmp_path, monkeypatch):
    import mlflow

    # runs laid out as Hydra does: outputs/NAME/TIME/
    run = ("logger=mlflow", "name=resumable")
    first = train(make_cfg(*run, f"paths.output_dir={tmp_path}/outputs/resumable/1"))
    steps = first["global_step"]
    second = train(
        make_cfg(
            *run, "trainer.max_epochs=2", "resume=auto", f"paths.output_dir={tmp_path}/outputs/resumable/2"
        )
    )
    assert second["resumed_from"] == first["last_checkpoint"]
    assert second["global_step"] == 2 * steps

    # Through the environment, not mlflow.set_tracking_uri, whose process-wide setting would
    # outlive this test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["resumable"])
    assert len(runs) == 1  # the resumed training logged into the same run
    run = runs.iloc[0]
    assert run["params.data/batch_size"] == "16" and run["params.model/backbone"] == "test_resnet"
    assert 0 <= run["metrics.val/acc"] <= 1
    history = mlflow.tracking.MlflowClient().get_metric_history(run["run_id"], "val/acc")
    assert len(history) == 2  # one value per epoch, across both invocations
    artifacts = [a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run["run_id"])]
    assert artifacts, "the best checkpoint is logged as an artifact"
    ckpt = torch.load(second["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt[KEY]["run_ids"]["mlflow"] == run["run_id"]


def test_resume_of_another_model_is_refused(make_cfg, tmp_path):
    from data.errors import UserError

    first = train(make_cfg())
    with pytest.raises(UserError, match=r"cannot resume from .*backbone test_resnet -> resnet18"):
        train(make_cfg("model.backbone=resnet18", f"resume={first['last_checkpoint']}"))


def test_wandb_offline_run_holds_history_and_no_secrets(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("SHARDTRAIN_TEST_API_TOKEN", "s3cr3t-value-123")
    train(make_cfg("logger=wandb", "+extra.token=${oc.env:SHARDTRAIN_TEST_API_TOKEN}"))
    runs = list((tmp_path / "outputs" / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].rglob("*.wandb"))
    raw = b"".join(p.read_bytes() for p in files)
    assert b"val/acc" in raw and b"train/loss" in raw
    assert b"s3cr3t-value-123" not in b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())


def test_resume_continues_the_same_wandb_run(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = ("logger=wandb", "name=w")
    first = train(make_cfg(*run, f"paths.output_dir={tmp_path}/outputs/w/1"))
    train(make_cfg(*run, "resume=auto", "trainer.max_epochs=2", f"paths.output_dir={tmp_path}/outputs/w/2"))
    ids = {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "outputs" / "w").glob("*/wandb/offline-run-*")}
    saved = torch.load(first["last_checkpoint"], map_location="cpu", weights_only=True)[KEY]["run_ids"]
    assert ids == {saved["wandb"]}  # both invocations wrote to one run


def test_tensorboard_and_csv_write_their_files(make_cfg, tmp_path):
    train(make_cfg("logger=[csv,tensorboard]"))
    assert list((tmp_path / "outputs" / "run" / "csv").rglob("metrics.csv"))
    assert list((tmp_path / "outputs" / "run" / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_mixed_precision_via_the_trainer(make_cfg, precision):
    result = train(make_cfg(f"trainer.precision={precision}"))
    assert "val/acc" in result["metrics"]


def test_two_process_ddp_on_cpu_counts_every_val_sample_once(tmp_path, train_command):
    # Lightning's DDP launcher re-runs the command line for rank 1, so this goes through the CLI.
    out = subprocess.run(
        train_command(
            "data.num_workers=1",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "logger=csv",
            "data.audit=true",
        ),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    table = log.split("columns: predicted):\n", 1)[1].splitlines()[1:6]
    assert sum(int(n) for row in table for n in row.split()[1:]) == 60  # 60 val samples, once each
    last = next((tmp_path / "outputs" / "default").glob("*/checkpoints/last.ckpt"))
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 180 // (2 * 16)  # each rank: the same 5 full batches
    assert ckpt["ShardDataModule"]["world_size"] == 2
    ranks = [p.read_text().split() for p in sorted(last.parent.parent.glob("audit/epoch000-rank*.txt"))]
    assert [len(r) for r in ranks] == [80, 80]  # each rank its own samples, disjoint
    assert not set(ranks[0]) & set(ranks[1])
    # summary.json, written once (by rank 0): the best checkpoint a pipeline's next step takes
    summary = json.loads((last.parent.parent / "summary.json").read_text())
    assert Path(summary["best_checkpoint"]).parent == last.parent and summary["last_checkpoint"] == str(last)
    assert summary["global_step"] == 5 and "val/acc" in summary["metrics"]
