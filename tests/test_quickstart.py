"""The README's promise, end to end: `python -m train +experiment=quickstart` learns."""

from __future__ import annotations

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
