"""The large-image set: deterministic, balanced, small defects exactly where the mask says, each
visible against the surface around it, and fast enough at 4000x3000 for a loader to keep up."""

import hashlib
import io
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from scipy import ndimage

from data import synthetic_large
from data.synthetic_large import CLASSES, EDGE, SURFACES, encode_jpeg, encode_mask_png, label_of, render_large

_REPO = Path(synthetic_large.__file__).resolve().parents[1]
_W, _H = 640, 480

# Fingerprints of a few samples in a fresh interpreter: no state may leak between calls, and the
# module must not pull in torch or scipy (it runs in every loader worker).
_FRESH = """
import hashlib, json, sys
from data.synthetic_large import render_large
out = {"heavy": [m for m in ("torch", "scipy") if m in sys.modules], "digests": []}
for i in (6, 1, 0):
    img, label, meta, mask = render_large(11, i, 333, 257)
    out["digests"].append([hashlib.sha256(img.tobytes() + mask.tobytes()).hexdigest(), label, meta])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parts() -> list[tuple]:
    """40 parts of 640x480 px: ten aligned blocks of four."""
    return [render_large(5, i, _W, _H) for i in range(40)]


def _digest(seed: int, index: int, width: int, height: int) -> list:
    img, label, meta, mask = render_large(seed, index, width, height)
    return [hashlib.sha256(img.tobytes() + mask.tobytes()).hexdigest(), label, meta]


def test_render_is_a_pure_function_of_seed_index_and_size():
    first = _digest(5, 13, 400, 300)
    render_large(5, 14, 400, 300), render_large(6, 13, 300, 400)  # other calls in between change nothing
    assert _digest(5, 13, 400, 300) == first
    assert _digest(6, 13, 400, 300)[0] != first[0] and _digest(5, 17, 400, 300)[0] != first[0]

    fresh = subprocess.run(
        [sys.executable, "-c", _FRESH], capture_output=True, text=True, check=True, cwd=_REPO
    )
    got = json.loads(fresh.stdout)
    assert got["heavy"] == []
    assert got["digests"] == [_digest(11, i, 333, 257) for i in (6, 1, 0)]


def test_shapes_dtypes_and_meta(parts):
    # Odd sides: no multiple of a band (96 rows) or of a knot spacing.
    for width, height in ((333, 257), (128, 129)):
        img, _, meta, mask = render_large(2, 3, width, height)
        assert img.shape == (height, width, 3) and img.dtype == np.uint8
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        json.dumps(meta)
    for img, label, meta, mask in parts:
        assert img.shape == (_H, _W, 3) and img.dtype == np.uint8 and mask.dtype == np.uint8
        assert meta["defect"] == CLASSES[label]
        json.dumps(meta)  # shards store it as JSON
        assert 2 <= meta["noise"] <= 4 and meta["dust_specks"] >= 0
        assert (img == 255).mean() < 0.01 and (img == 0).mean() < 0.01, "clipped"
    assert {meta["surface"]["kind"] for _, _, meta, _ in parts} == set(SURFACES)


def test_labels_are_balanced_and_agree_with_render(parts):
    labels = [label_of(5, i) for i in range(40)]
    assert Counter(labels) == {0: 20, 1: 10, 2: 10}
    assert all(sorted(labels[k : k + 4]) == [0, 0, 1, 2] for k in range(0, 40, 4))
    assert [label for _, label, _, _ in parts] == labels
    assert labels != [label_of(6, i) for i in range(40)]
    assert CLASSES == ("ok", "spot", "scratch")


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="seed=-1"):
        label_of(-1, 0)
    with pytest.raises(ValueError, match="index=-2"):
        render_large(0, -2, 640, 480)
    with pytest.raises(ValueError, match="640x100 px"):
        render_large(0, 0, 640, 100)


def test_masks_hold_the_label_on_each_small_defect_inside_the_edge(parts):
    # Dust specks (under 3 px) and the texture are on every part, and never in its mask.
    assert sum(meta["dust_specks"] for _, label, meta, _ in parts if label == 0) > 0
    for i, (_, label, meta, mask) in enumerate(parts):
        if label == 0:
            assert not mask.any() and meta["defects"] == [], f"good part {i} has a defect"
            continue
        assert set(np.unique(mask)) == {0, label}, f"part {i}"
        regions, count = ndimage.label(mask > 0)  # 4-connected
        assert 1 <= count <= 3 and count == len(meta["defects"]), f"part {i}: {count} regions"
        boxes = sorted([s.start, t.start, s.stop, t.stop] for s, t in ndimage.find_objects(regions))
        assert boxes == sorted(d["box"] for d in meta["defects"]), f"part {i}: meta's boxes"
        for y0, x0, y1, x1 in boxes:
            assert 8 <= max(y1 - y0, x1 - x0) <= 60, f"part {i}: box {y0, x0, y1, x1}"
            assert min(y0, x0) >= EDGE and y1 <= _H - EDGE and x1 <= _W - EDGE, f"part {i}: near the edge"
        assert all(d["kind"] == CLASSES[label] for d in meta["defects"])


def test_defect_sizes_and_contrasts_are_as_documented():
    drawn = Counter()
    for i in (i for i in range(200) if label_of(8, i)):
        for d in render_large(8, i, 256, 192)[2]["defects"]:
            drawn[d["kind"]] += 1
            if d["kind"] == "spot":
                short = d["diameter"] / d["aspect"]  # of values rounded to 0.01
                assert short > 9.9 and d["diameter"] <= 50
                assert 15 <= abs(d["contrast"]) <= 40
            else:
                assert 20 <= d["length"] <= 50 and 2 <= d["width"] <= 4 and 0.5 <= abs(d["bend"]) <= 3
                assert 20 <= abs(d["contrast"]) <= 45
    assert min(drawn.values()) > 50, drawn  # two per defective part expected


def test_each_defect_stands_out_from_the_surface_around_it(parts):
    """The mean grey level inside a defect differs from a ring 3-8 px around it by more than the
    texture, the lighting and the noise make two such areas of one surface differ."""
    gaps = []
    for i, (img, _, _, mask) in enumerate(parts):
        grey = img.mean(2)
        regions, count = ndimage.label(mask > 0)
        for k in range(1, count + 1):
            inside = regions == k
            ring = ndimage.binary_dilation(inside, iterations=8) & ~ndimage.binary_dilation(
                inside, iterations=3
            )
            gap = abs(grey[inside].mean() - grey[ring & (mask == 0)].mean())
            assert gap > 8, f"part {i}, defect {k}: {gap:.1f} grey levels from its surroundings"
            gaps.append(gap)
    print(
        f"defect contrast: {np.min(gaps):.1f} to {np.max(gaps):.1f} grey levels, median {np.median(gaps):.1f}"
    )


def test_a_line_camera_frame_renders_in_well_under_a_second():
    start = time.perf_counter()
    img, label, meta, mask = render_large(1, 2, 4000, 3000)
    seconds = time.perf_counter() - start
    assert img.shape == (3000, 4000, 3) and mask.shape == (3000, 4000)
    assert label and set(np.unique(mask)) == {0, label} and meta["defects"]
    assert seconds < 2, f"4000x3000 render took {seconds:.2f} s; it should take about 0.2 s on one core"


def test_encoders_are_deterministic_and_round_trip(parts):
    img, _, _, mask = next(p for p in parts if p[1])
    jpeg = encode_jpeg(img, quality=90)
    assert jpeg == encode_jpeg(img, quality=90)
    back = Image.open(io.BytesIO(jpeg))
    assert (
        back.format == "JPEG" and back.size == (_W, _H) and JpegImagePlugin.get_sampling(back) == 2
    )  # 4:2:0
    assert np.abs(np.asarray(back, np.int16) - img).mean() < 3
    png = encode_mask_png(mask)
    assert png == encode_mask_png(mask)
    back = Image.open(io.BytesIO(png))
    assert back.format == "PNG" and back.mode == "L" and np.array_equal(np.asarray(back), mask)
