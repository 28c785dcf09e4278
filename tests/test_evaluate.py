"""`python -m train.evaluate`: the report against a count by hand, on one and on two ranks."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.errors import UserError
from data.index import load_index
from data.samples import read_shard
from data.write import write_dataset
from train import load_model
from train.checkpoint import KEY
from train.cli import compose
from train.evaluate import evaluate
from train.network import ModelSpec
from train.outputs import published
from train.resume import check_resumable

CLASSES = ["ok", "crack", "scratch", "spot", "stain"]  # a data set with masks lists good first


def eval_cfg(ckpt: str, out, *overrides: str):
    return compose(
        "evaluate",
        f"ckpt={ckpt}",
        f"out={out}",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "data.batch_size=16",
        "data.num_workers=0",
        *overrides,
    )


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    return evaluate(eval_cfg(trained, out)), out


def by_hand(ckpt: str, index_url: str) -> tuple[list, list, list]:
    """Every val image read from the shards and predicted one at a time by `load_model`."""
    index, model = load_index(index_url), load_model(ckpt)
    keys, labels, predicted = [], [], []
    for shard in index.split("val").shards:
        for sample in read_shard(index.shard_url(shard)):
            import io

            keys.append(sample["__key__"])
            labels.append(int(sample["cls"]))
            predicted.append(
                model.spec.classes.index(model.predict(Image.open(io.BytesIO(sample["jpg"])))["label"])
            )
    return keys, labels, predicted


def test_metrics_match_a_count_by_hand(report, trained, tiny_index):
    metrics, out = report
    keys, labels, predicted = by_hand(trained, tiny_index)
    assert metrics["samples"] == metrics["split_samples"] == len(keys) == 60
    assert metrics["top1"] == pytest.approx(np.mean(np.array(labels) == predicted))
    confusion = np.zeros((5, 5), int)
    for t, p in zip(labels, predicted):
        confusion[t, p] += 1
    assert metrics["confusion"] == confusion.tolist()
    for i, name in enumerate(CLASSES):
        c = metrics["per_class"][name]
        assert c["support"] == labels.count(i)
        assert c["recall"] == pytest.approx(confusion[i, i] / max(1, confusion[i].sum()))
        assert c["precision"] == pytest.approx(confusion[i, i] / max(1, confusion[:, i].sum()))
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == sorted(keys)
    assert sorted(r["predicted"] for r in rows) == sorted(CLASSES[p] for p in predicted)
    for name in ("confusion.png", "mistakes.png", "defect.png", "model.ckpt"):
        assert (out / name).stat().st_size > 0
    mistakes = Image.open(out / "mistakes.png")
    assert mistakes.width == 8 * 128  # 32 mistakes shown, 8 per row (a weak model makes > 32)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


def test_defect_threshold_is_chosen_stored_and_used_by_predict(report):
    metrics, out = report
    d = metrics["defect"]
    assert d["good"] == "ok" and d["defect_classes"] == ["crack", "scratch", "spot", "stain"]
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    defects = np.array([float(r["defect_score"]) for r in rows if r["label"] != "ok"])
    goods = np.array([float(r["defect_score"]) for r in rows if r["label"] == "ok"])
    assert (d["defect_samples"], d["good_samples"]) == (len(defects), len(goods))
    # The csv rounds scores to 6 places: compare away from the threshold.
    assert d["escapes"] == int((defects < d["threshold"] - 1e-6).sum())
    assert d["false_alarms"] == int((goods >= d["threshold"] + 1e-6).sum())
    assert d["escape_rate"] <= d["target_escape"] == 0.005

    model = load_model(str(out / "model.ckpt"))
    stored = model.spec.extra["decision"]
    assert stored == {"good": "ok", "defect_classes": CLASSES[1:], "threshold": d["threshold"]}
    image = torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8)
    result = model.predict(image)
    assert result["defect_score"] == pytest.approx(1 - result["probs"]["ok"])
    assert result["defect"] == (result["defect_score"] >= d["threshold"])
    meta = torch.load(out / "model.ckpt", weights_only=True)[KEY]
    assert meta["evaluation"]["defect"]["threshold"] == d["threshold"] and "optimizer_states" not in meta
    with pytest.raises(UserError, match="weights only"):
        check_resumable("model.ckpt", meta, ModelSpec.from_dict(meta["model"]))


def test_two_ranks_count_every_sample_once_and_agree_with_one(report, trained, tmp_path):
    one, _ = report
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "train.evaluate", f"ckpt={trained}", f"out={out}", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.enable_progress_bar=false",
        "data.batch_size=7", "data.num_workers=1",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    assert two["samples"] == 60 and two["confusion"] == one["confusion"]
    assert two["top1"] == one["top1"] and two["defect"]["threshold"] == pytest.approx(
        one["defect"]["threshold"]
    )
    with open(out / "predictions.csv") as f:
        assert len({r["key"] for r in csv.DictReader(f)}) == 60


def test_bad_samples_are_skipped_and_counted(trained, tmp_path):
    from data.sources import from_synthetic

    items = list(from_synthetic(40, seed=5, size=48))
    data = write_dataset(items, str(tmp_path / "shards"), val_fraction=0.5, shard_samples=10, workers=1)
    shard = data.index.shard_url(data.index.split("val").shards[0])
    with open(shard, "r+b") as f:
        raw = f.read()
        f.seek(raw.find(b"\xff\xd8\xff") + 200)  # into the first JPEG: ruin it, keep the tar intact
        f.write(bytes(1000))
    metrics = evaluate(eval_cfg(trained, tmp_path / "r", f"data.index={data.index.location}"))
    assert metrics["bad_samples"]["count"] >= 1
    assert metrics["samples"] + metrics["bad_samples"]["count"] == metrics["split_samples"] == 20


def test_out_is_never_half_written_nor_wrongly_replaced(trained, tmp_path, report):
    _, previous = report
    with pytest.raises(UserError, match="already holds files"):
        evaluate(eval_cfg(trained, previous))
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("not a report")
    with pytest.raises(UserError, match=r"not a previous output \(no metrics\.json\)"):
        evaluate(eval_cfg(trained, tmp_path / "work", "overwrite=true"))
    parent = os.path.dirname(os.path.dirname(trained))  # the training run holding the checkpoint
    with pytest.raises(UserError, match="will not replace this directory"):
        evaluate(eval_cfg(trained, parent, "overwrite=true"))
    out = tmp_path / "keep"
    out.mkdir()
    (out / "old.txt").write_text("previous report")
    with pytest.raises(RuntimeError), published(str(out)) as tmp:
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            f.write("{")
        raise RuntimeError("killed while writing")
    assert os.listdir(out) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["keep", "work"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("defect.good=good", "defect.good=good: not a class of this model"),
        ("defect.classes=[dent]", "defect.classes"),
        ("ckpt=/nowhere.ckpt", "checkpoint /nowhere.ckpt: no such file"),
        ("split=test", "no split 'test'"),
    ],
)
def test_bad_input_gets_one_message(trained, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        evaluate(eval_cfg(trained, tmp_path / "r", override))
    assert not (tmp_path / "r").exists()


def test_cli_exits_2_with_the_message(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "train.evaluate", f"out={tmp_path}/r"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "ckpt is not set" in run.stdout + run.stderr


def test_report_is_logged_to_mlflow_and_wandb(trained, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    metrics = evaluate(
        eval_cfg(
            trained,
            tmp_path / "r",
            "logger=[mlflow,wandb]",
            f"logger.mlflow.tracking_uri={uri}",
            f"logger.mlflow.artifact_location={tmp_path}/artifacts",
        )
    )
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("trained")  # the name the checkpoint was trained under
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "evaluate-val" and run.data.tags["split"] == "val"
    assert run.data.metrics["eval/val/top1"] == pytest.approx(metrics["top1"])
    assert run.data.metrics["eval/val/defect/threshold"] == pytest.approx(metrics["defect"]["threshold"])
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/confusion.png", "evaluation/defect.png"} <= files
    (offline,) = (tmp_path / "r" / "wandb").glob("offline-run-*")
    assert (offline / "files" / "metrics.json").is_file()


def test_a_split_without_defect_samples_reports_without_a_threshold():
    from train.evaluate import _decide

    r = {"is_defect": np.zeros(3, bool)}
    scores = np.array([0.1, 0.2, 0.4])
    section, decision, curves = _decide(("ok", ("scratch",), 0.005, None, "target_escape", 0.01), r, scores)
    assert decision is None and curves is None and "no defect samples" in section["skipped"]


def test_precision_other_than_32_is_refused(trained, tmp_path):
    with pytest.raises(UserError, match=r"trainer\.precision=bf16-mixed: evaluate in 32-true"):
        evaluate(eval_cfg(trained, tmp_path / "r", "trainer.precision=bf16-mixed"))


def test_ranks_without_samples_still_take_part(trained, tmp_path):
    """5 samples on 6 ranks: a rank with nothing to predict must not hang the gather."""
    from data.sources import from_synthetic

    items = list(from_synthetic(30, seed=2, size=48))
    data = write_dataset(items, str(tmp_path / "shards"), val_fraction=0.1, shard_samples=50, workers=1)
    assert data.index.split("val").num_samples == 5
    cmd = [
        sys.executable, "-m", "train.evaluate", f"ckpt={trained}", f"out={tmp_path / 'r'}",
        f"data.index={data.index.location}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=6",
        "trainer.enable_progress_bar=false", "data.num_workers=0",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["samples"] == 5


def test_an_evaluated_model_is_judged_by_its_own_threshold(report, tmp_path):
    first, out = report
    again = evaluate(eval_cfg(str(out / "model.ckpt"), tmp_path / "again", "defect.target_escape=0.2"))
    d = again["defect"]
    assert d["chosen_by"] == "stored with the model" and d["threshold"] == first["defect"]["threshold"]
    anew = evaluate(
        eval_cfg(
            str(out / "model.ckpt"), tmp_path / "anew", "defect.target_escape=0.2", "defect.threshold=choose"
        )
    )["defect"]
    assert anew["chosen_by"] == "target_escape" and anew["escape_rate"] <= 0.2
    assert anew["threshold"] > d["threshold"]  # a looser target allows a higher threshold


def test_an_unreachable_tracker_costs_the_run_but_not_the_report(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(UserError, match=r"report is written to .* but logging it to the tracker failed"):
        evaluate(eval_cfg(trained, tmp_path / "r", "logger=mlflow", f"logger.mlflow.tracking_uri={dead}"))
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["samples"] == 60
