"""`python -m data inspect`: the histogram matches the shards; the grid has a row per class."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from data.index import load_index
from data.overview import THUMB, histogram


def test_histogram_counts_what_the_shards_hold(tiny_index):
    counts = histogram(load_index(tiny_index))
    assert {s: sum(c.values()) for s, c in counts.items()} == {"train": 180, "val": 60}
    assert set(counts["val"].values()) == {12}  # the embedded set is balanced: 5 classes x 12


def test_cli_prints_the_table_and_writes_the_grid(tiny_index, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "data",
            "inspect",
            tiny_index,
            "--out",
            str(tmp_path / "g.png"),
            "--per-class",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["class", "train", "val"]
    assert lines[6].split() == ["total", "180", "60"]
    grid = Image.open(tmp_path / "g.png")
    assert grid.size[1] == 5 * THUMB and grid.size[0] > 4 * THUMB
    cell = grid.crop((grid.size[0] - THUMB, 0, grid.size[0], THUMB))
    assert len(set(cell.getdata())) > 50  # a real image fills the last cell of the first row
