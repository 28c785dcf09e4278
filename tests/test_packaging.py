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
    configs = {f"train/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, f"missing from the wheel: {sorted(configs - names)}"
    assert {"train/run.py", "data/write.py"} <= names


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
