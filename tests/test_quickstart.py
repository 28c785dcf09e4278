"""The README's promise, end to end: `python -m train +experiment=quickstart` learns."""

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
    best = re.search(r"best checkpoint: (\S+\.ckpt)", log).group(1)
    for command in (
        ["train.evaluate", f"ckpt={best}", "out=eval", "trainer.enable_progress_bar=false"],
        ["train.export", "ckpt=eval/model.ckpt", "format=onnx", "out=bundle"],
    ):
        step = subprocess.run(
            [sys.executable, "-m", *command], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert step.returncode == 0, (step.stdout + step.stderr)[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(acc, abs=1e-4) and metrics["samples"] == 2000
    assert metrics["defect"]["escape_rate"] <= 0.005
    assert json.loads((tmp_path / "bundle" / "parity.json").read_text())["passed"] is True
