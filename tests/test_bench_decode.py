"""scripts/bench_decode.py runs on a few JPEGs of its own and writes sane figures.

In the project's venv simplejpeg and PyTurboJPEG are missing, so this checks the skip path; the
peers' figures are checked where they are installed. No timed asserts."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict:
    """The JSON of a --quick run over 12 JPEGs, 300 to 1000 px: enough that TrainTransform's
    crops take the direct path and every DCT scale."""
    tmp = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(0)
    for i in range(12):
        w, h = 300 + 60 * i, 1000 - 50 * i
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = (pixels + rng.integers(-10, 11, pixels.shape)).clip(0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90, subsampling=2)
        (tmp / f"{i:02d}.jpg").write_bytes(out.getvalue())
    cmd = [sys.executable, str(SCRIPTS / "bench_decode.py"), "--quick", "--jpegs", str(tmp)]
    done = subprocess.run(
        [*cmd, "--json", str(tmp / "decode.json")],
        capture_output=True,
        text=True,
        cwd=SCRIPTS,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    doc = json.loads((tmp / "decode.json").read_text())
    doc["stdout"] = done.stdout
    return doc


def present(doc: dict) -> list[str]:
    return [n for n in ("simplejpeg", "pyturbojpeg") if n in doc["results"]["full"]]


def test_every_contender_present_has_its_figures(figures):
    assert figures["images"] == 12
    names = present(figures)
    for section in ("full", "1/2", "1/4", "1/8"):
        expected = {"pil", *names} | ({"torchvision"} if section == "full" else set())
        assert set(figures["results"][section]) == expected, section
        assert set(figures["pixels"][section]) == expected, section
    assert set(figures["results"]["transform"]) == {"ours", "pil", "pil+torchvision", *names}
    assert figures["results"]["transform"]["ours"]["over_ours"] == 1
    for section in figures["results"].values():
        assert all(r["img_s"] > 0 and r["ms"] > 0 for r in section.values())
    # A contender that is missing is named, with the command that installs it.
    if len(names) < 2:
        assert figures["missing"] and 'pip install -e ".[bench]"' in figures["stdout"]


def test_pixels_agree_with_pillow_and_ours(figures):
    pixels = figures["pixels"]
    for section in ("full", "1/2", "1/4", "1/8"):
        assert pixels[section]["pil"]["max"] == 0, section
    assert pixels["transform"]["ours"]["max"] == 0
    # Pillow and torchvision both decode with libjpeg-turbo (islow DCT, fancy upsampling).
    tv = pixels["full"]["torchvision"]
    assert tv["shape_mismatches"] == 0 and tv["max"] <= 2 and tv["mean"] < 0.05
    # The swapped transform reproduces ours when only the decoder differs (all libjpeg-turbo).
    for name in ("pil", "pil+torchvision"):
        d = pixels["transform"][name]
        assert d["shape_mismatches"] == 0 and d["share_over_1"] < 0.01, name


def test_simplejpeg_figures_appear_when_installed(figures):
    pytest.importorskip("simplejpeg")
    assert "simplejpeg" not in figures["missing"]
    for section in ("full", "1/2", "1/4", "1/8", "transform"):
        assert figures["results"][section]["simplejpeg"]["img_s"] > 0, section
    for section in ("full", "1/2", "1/4", "1/8"):
        d = figures["pixels"][section]["simplejpeg"]
        assert d["shape_mismatches"] == 0 and d["max"] <= 2, section
