"""`pip install .` must carry the config tree: Hydra finds it as the package `train.conf`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_config_tree(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("shardtrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "train/conf/train.yaml",
        "train/conf/experiment/quickstart.yaml",
        "train/conf/data/shards.yaml",
        "train/run.py",
        "data/write.py",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"


def test_config_is_found_from_any_working_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "train", "--cfg", "job", "+experiment=quickstart"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "name: quickstart" in out.stdout and "backbone:" in out.stdout
