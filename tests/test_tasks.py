"""The task layer end to end: multi-label and segmentation through the real entry points (train,
evaluate, export, load_model), on tiny shards with real masks and labels."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.index import load_index
from data.samples import read_shard
from data.sources import from_synthetic
from data.write import write_dataset
from tests.conftest import compose_cfg, tiny
from train import load_model
from train.cli import compose
from train.evaluate import evaluate
from train.export import export
from train.run import train


@pytest.fixture(scope="module")
def multi_index(tmp_path_factory) -> str:
    """240 synthetic parts (48 px), half of the defective ones with defects of several kinds."""
    out = tmp_path_factory.mktemp("multi")
    items = from_synthetic(240, seed=3, size=48, multi=0.5)
    return write_dataset(items, str(out), val_fraction=0.25, shard_samples=50, workers=1).index.location


def _train(root, index: str, *overrides: str) -> str:
    cfg = compose_cfg(
        f"paths.log_dir={root}/outputs",
        f"paths.output_dir={root}/outputs/run",
        *tiny(index),
        "logger=none",
        "trainer.max_epochs=2",
        *overrides,
    )
    return train(cfg)["best_checkpoint"]


def _val_images(index_url: str, n: int) -> list[Image.Image]:
    index = load_index(index_url)
    shard = index.split("val").shards[0]
    return [Image.open(io.BytesIO(s["jpg"])) for s, _ in zip(read_shard(index.shard_url(shard)), range(n))]


def _round_trip(tmp_path, ckpt: str, index: str) -> tuple[dict, list, list]:
    """Evaluate (which writes model.ckpt with the chosen threshold), export it to ONNX, and
    predict the same images with both."""
    base = ["trainer=cpu", "trainer.enable_progress_bar=false", "data.batch_size=16", "data.num_workers=0"]
    report = evaluate(compose("evaluate", f"ckpt={ckpt}", f"out={tmp_path}/eval", *base))
    model_ckpt = f"{tmp_path}/eval/model.ckpt"
    parity = export(compose("export", f"ckpt={model_ckpt}", "format=onnx", f"out={tmp_path}/bundle"))
    assert parity["passed"] is True
    images = _val_images(index, 12)
    return report, load_model(model_ckpt).predict(images), load_model(f"{tmp_path}/bundle").predict(images)


def test_multilabel_round_trip(tmp_path, multi_index):
    ckpt = _train(tmp_path, multi_index, "task=multilabel")
    report, from_ckpt, from_bundle = _round_trip(tmp_path, ckpt, multi_index)
    assert report["task"] == "multilabel" and report["samples"] == 60
    assert set(report["per_label"]) == {"crack", "scratch", "spot", "stain"}  # not the good class
    assert set(report["defect"]["label_thresholds"]) == set(report["per_label"])
    for a, b in zip(from_ckpt, from_bundle):
        assert set(a) == {"labels", "probs", "defect_score", "defect"}
        assert a["labels"] == b["labels"] and a["defect"] == b["defect"]
        assert a["defect_score"] == pytest.approx(b["defect_score"], abs=1e-4)
        assert "ok" not in a["labels"]
    info = json.loads((tmp_path / "bundle" / "preprocess.json").read_text())
    assert info["task"]["name"] == "multilabel" and info["decision"]["labels"]


def test_segment_round_trip(tmp_path, tiny_index):
    ckpt = _train(tmp_path, tiny_index, "task=segment", "task.decoder_channels=[16,16,16,8,8]")
    report, from_ckpt, from_bundle = _round_trip(tmp_path, ckpt, tiny_index)
    assert report["task"] == "segment" and report["pixels"] == 60 * 48 * 48  # at the images' own size
    assert 0 <= report["defect_iou"] <= 1 and set(report["per_class"]) == set(load_index(tiny_index).classes)
    threshold = json.loads((tmp_path / "bundle" / "preprocess.json").read_text())["decision"]["threshold"]
    classes = load_index(tiny_index).classes
    agree = []
    for a, b in zip(from_ckpt, from_bundle):
        assert a["mask"].shape == (48, 48) and a["mask"].dtype == np.uint8
        assert a["areas"] == {c: int((a["mask"] == i).sum()) for i, c in enumerate(classes) if i}
        assert a["defect"] == (a["defect_score"] >= threshold)
        agree.append((a["mask"] == b["mask"]).mean())
    assert np.mean(agree) >= 0.999
    for name in ("metrics.json", "predictions.csv", "mistakes.png", "defect.png", "confusion.png"):
        assert (tmp_path / "eval" / name).is_file()


def test_segment_predicts_at_the_input_images_own_size(tmp_path, tiny_index):
    ckpt = _train(
        tmp_path, tiny_index, "task=segment", "trainer.max_epochs=1", "task.decoder_channels=[8,8,8,8,8]"
    )
    model = load_model(ckpt)
    out = model.predict([torch.zeros(3, 50, 70, dtype=torch.uint8), Image.new("RGB", (33, 21))])
    assert out[0]["mask"].shape == (50, 70) and out[1]["mask"].shape == (21, 33)
    assert "defect" in out[0]  # a default rule from training on: a region of min_area pixels at 0.5


def test_task_segment_on_a_data_set_without_masks_is_refused(tmp_path):
    from data.sources import Item

    items = [
        Item(i.label, i.read, i.source, meta=i.meta)  # the same parts, listed without masks
        for i in from_synthetic(40, seed=1, size=32)
    ]
    written = write_dataset(items, str(tmp_path / "nomask"), val_fraction=0.25, workers=1)
    cmd = [sys.executable, "-m", "train", *tiny(written.index.location), "task=segment"]
    cmd.append(f"paths.log_dir={tmp_path}")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "task=segment needs masks" in run.stdout + run.stderr


@pytest.mark.slow
def test_two_ranks_count_the_same_pixels_as_one(tmp_path, tiny_index):
    ckpt = _train(
        tmp_path, tiny_index, "task=segment", "trainer.max_epochs=1", "task.decoder_channels=[8,8,8,8,8]"
    )
    one = evaluate(
        compose("evaluate", f"ckpt={ckpt}", f"out={tmp_path}/one", "trainer=cpu", "data.num_workers=0")
    )
    cmd = [
        sys.executable, "-m", "train.evaluate", f"ckpt={ckpt}", f"out={tmp_path}/two", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.enable_progress_bar=false",
        "data.batch_size=7", "data.num_workers=1",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["confusion"] == one["confusion"] and two["pixels"] == one["pixels"]
    assert two["defect"]["threshold"] == pytest.approx(one["defect"]["threshold"])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["multilabel", "segment"])
def test_ddp_trains_every_task_on_each_sample_once(tmp_path, train_command, task):
    """2 CPU ranks, the audit on: each rank trains its own equal share, no sample twice."""
    cmd = train_command(
        f"task={task}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.audit=true",
        "data.num_workers=1", "logger=none", f"paths.log_dir={tmp_path}", "name=ddp",
    )  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (run_dir,) = (tmp_path / "ddp").iterdir()
    files = {p.name: p.read_text().splitlines() for p in sorted((run_dir / "audit").glob("epoch*.txt"))}
    assert sorted(files) == ["epoch000-rank000.txt", "epoch000-rank001.txt"]
    keys = files["epoch000-rank000.txt"] + files["epoch000-rank001.txt"]
    assert len(files["epoch000-rank000.txt"]) == len(files["epoch000-rank001.txt"]) == 5 * 16
    assert len(set(keys)) == len(keys) == 160  # 180 train samples, cut to 5 batches per rank


def test_region_score_is_the_strongest_region_of_min_area():
    from train.tasks.regions import region_score

    p = np.zeros((10, 10), np.float32)
    p[1:3, 1:3] = 0.9  # a region of 4 pixels at 0.9
    p[6:9, 6:9] = 0.6  # 9 pixels at 0.6
    p[0, 9] = 1.0  # one strong pixel
    assert region_score(p, 1) == pytest.approx(1.0)
    assert region_score(p, 4) == pytest.approx(0.9)
    assert region_score(p, 5) == pytest.approx(0.6)
    assert region_score(p, 10) == pytest.approx(0.0)  # at 0, the whole map is one region
    rng = np.random.default_rng(0)
    for _ in range(20):  # against brute force over every level
        q = rng.random((12, 12)).astype(np.float32) ** 3
        from scipy import ndimage

        def largest(t, q=q):
            labels, n = ndimage.label(q >= t, structure=np.ones((3, 3)))
            return np.bincount(labels.ravel())[1:].max() if n else 0

        best = max(t for t in np.unique(q) if largest(t) >= 6)
        assert region_score(q, 6) == pytest.approx(best)


def test_segmentation_and_multilabel_metrics_by_hand():
    from train.metrics import average_precision, multilabel_report, segmentation_report

    confusion = np.array([[90, 5, 5], [2, 6, 2], [0, 0, 0]])  # rows: true good, crack, spot
    r = segmentation_report(confusion, ("ok", "crack", "spot"), 0)
    assert r["per_class"]["crack"]["iou"] == pytest.approx(6 / (6 + 5 + 4))
    assert r["per_class"]["spot"]["iou"] == 0 and r["pixels"] == 110
    # defect pixels: true 10, predicted 10+... crack+spot against good: tp 8, fp 10, fn 2
    assert r["defect_iou"] == pytest.approx(8 / (8 + 10 + 2))
    truth = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool)
    probs = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.3], [0.1, 0.1]])
    m = multilabel_report(truth, probs, ("a", "b"), [0, 1], np.array([0.5, 0.5]))
    assert m["per_label"]["b"]["recall"] == 0.5 and m["per_label"]["a"]["f1"] == 1.0
    assert m["exact_set_accuracy"] == 0.75
    import torchmetrics.functional as tmf

    s = np.array([0.9, 0.4, 0.6, 0.1, 0.6])
    t = np.array([1, 0, 1, 0, 0], bool)
    expected = tmf.classification.binary_average_precision(torch.tensor(s), torch.tensor(t).long())
    assert average_precision(t, s) == pytest.approx(float(expected))


def test_checkpoints_and_bundles_from_before_tasks_load_as_classify():
    from train import tasks
    from train.bundle import spec_of
    from train.network import ModelSpec

    old = {"backbone": "test_resnet", "classes": ["a", "b"], "image_size": 32, "crop_pct": 0.875,
           "mean": [0.5] * 3, "std": [0.5] * 3, "extra": {}}  # fmt: skip
    spec = ModelSpec.from_dict(old)
    assert spec.task == "classify" and tasks.of(spec).name == "classify"
    info = {"model": {"backbone": "test_resnet"}, "classes": ["a", "b"], "image_size": 32, "crop_pct": 0.875,
            "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}  # fmt: skip
    assert spec_of(info).task == "classify"


def test_a_labels_own_threshold_has_the_best_f1():
    from train.tasks.multilabel import best_f1_threshold

    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2])
    truth = np.array([1, 1, 0, 1, 0, 0], bool)
    # at 0.8: tp 2, f1 = 4/5; at 0.4: tp 3, predicted 4, f1 = 6/7; at 0.9: 2/4
    assert best_f1_threshold(scores, truth) == pytest.approx(0.4)
