"""The README's promise, end to end: `python -m train +experiment=quickstart` learns.

The other quickstarts check each recipe's figures in the README (about 50 minutes together on 2
cores): marked `recipe` as well as `slow`, they run with `pytest -m recipe`, not in CI's hour."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_quickstart_learns_well_above_chance(tmp_path):
    env = {**os.environ, "SHARDTRAIN_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "train", "+experiment=quickstart", "trainer.enable_progress_bar=false"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    wall = time.perf_counter() - start
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    acc = float(re.search(r"final validation accuracy: ([0-9.]+)", log).group(1))
    print(f"quickstart: val/acc {acc:.4f} in {wall:.0f} s (incl. data generation)")
    assert acc >= 3 * (1 / 5), f"val/acc {acc} is under 3x chance"
    assert list((tmp_path / "outputs" / "quickstart").glob("*/checkpoints/last.ckpt"))

    # ...and the README's next steps: evaluate the best checkpoint, export it, load the bundle.
    # The best checkpoint is the epoch with the highest val/acc, not always the last one.
    found = re.search(r"best checkpoint: (\S+\.ckpt) \(val/acc ([0-9.]+)\)", log)
    best, best_acc = found.group(1), float(found.group(2))
    for command in (
        ["train.evaluate", f"ckpt={best}", "out=eval", "trainer.enable_progress_bar=false"],
        ["train.export", "ckpt=eval/model.ckpt", "format=onnx", "out=bundle"],
    ):
        step = subprocess.run(
            [sys.executable, "-m", *command], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert step.returncode == 0, (step.stdout + step.stderr)[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(best_acc, abs=1e-4) and metrics["samples"] == 2000
    assert metrics["defect"]["escape_rate"] <= 0.005
    assert json.loads((tmp_path / "bundle" / "parity.json").read_text())["passed"] is True


def _run(tmp_path, *args: str) -> str:
    env = {**os.environ, "SHARDTRAIN_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout + out.stderr


def _quickstart(tmp_path, experiment: str, figure: str, *overrides: str) -> tuple[float, float, dict]:
    """Train the experiment, evaluate its best checkpoint and export the evaluated model:
    (the figure the training log ends with, the best checkpoint's monitored score, metrics.json)."""
    log = _run(
        tmp_path, "train", f"+experiment={experiment}", "trainer.enable_progress_bar=false", *overrides
    )
    value = float(re.search(rf"final validation {figure}: ([0-9.]+)", log).group(1))
    print(f"{experiment}: {figure} {value:.4f}")
    best = re.search(r"best checkpoint: (\S+\.ckpt)", log).group(1)
    _run(tmp_path, "train.evaluate", f"ckpt={best}", "out=eval", "trainer.enable_progress_bar=false")
    _run(tmp_path, "train.export", "ckpt=eval/model.ckpt", "format=onnx", "out=bundle")
    assert json.loads((tmp_path / "bundle" / "parity.json").read_text())["passed"] is True
    # The best checkpoint is the epoch with the best monitored score, not always the last one.
    best_score = float(re.search(r"best checkpoint: \S+\.ckpt \(\S+ ([0-9.]+)\)", log).group(1))
    return value, best_score, json.loads((tmp_path / "eval" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.recipe
def test_quickstart_segment_finds_the_defect_pixels(tmp_path):
    iou, best_iou, metrics = _quickstart(tmp_path, "quickstart_segment", "defect-pixel IoU")
    assert iou >= 0.5 and metrics["task"] == "segment"
    assert metrics["defect_iou"] == pytest.approx(best_iou, abs=1e-3)
    assert metrics["defect"]["roc_auc"] >= 0.9


@pytest.mark.slow
@pytest.mark.recipe
def test_quickstart_multilabel_names_the_defects(tmp_path):
    f1, _, metrics = _quickstart(tmp_path, "quickstart_multilabel", "macro F1")
    assert f1 >= 0.8 and metrics["task"] == "multilabel" and metrics["macro_f1"] >= 0.8


@pytest.mark.slow
@pytest.mark.recipe
def test_quickstart_anomaly_learns_good_parts_only(tmp_path):
    # 20 of its 30 epochs (8 minutes here, to image AUROC 0.93), to keep CI within its hour
    auroc, _, metrics = _quickstart(tmp_path, "quickstart_anomaly", "image AUROC", "trainer.max_epochs=20")
    assert auroc >= 0.85 and metrics["task"] == "anomaly" and metrics["image_auroc"] >= 0.85
    assert metrics["pixel_auroc"] >= 0.7 and metrics["defect"]["chosen_by"] == "target_escape"


@pytest.mark.slow
@pytest.mark.recipe
def test_quickstart_tiles_finds_small_defects_on_large_parts(tmp_path):
    # About 47 minutes here; it tells spot parts from good ones and scratch parts only partly on
    # these 24 (README: IoU 0.41 at the end, 0.43 at the best epoch, whose part ROC AUC is 0.85):
    # the bars say it learned, judged on whole parts at full size, not that it meets the aim
    iou, _, metrics = _quickstart(tmp_path, "quickstart_tiles", "defect-pixel IoU")
    assert metrics["task"] == "segment" and metrics["samples"] == 24 and metrics["pixels"] == 24 * 3000 * 2000
    assert iou >= 0.25 and metrics["per_class"]["spot"]["iou"] >= 0.25
    assert metrics["defect"]["roc_auc"] >= 0.75
    loc = metrics["localisation"]
    assert loc["caught"] >= 6 and loc["localised_share"] >= 0.75
