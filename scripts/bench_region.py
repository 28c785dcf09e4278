"""What a tile of a large JPEG costs: `data.region.decode_region` against PIL's full decode then crop.

    python scripts/bench_region.py [--megapixels 20] [--tile 256] [--repeats 3] [--calls 40]

Draws a 3:2 image of realistic content (a smooth random texture at two scales plus pixel noise,
so it does not compress to nothing), saves it as a JPEG (quality 90, 4:2:0), and decodes one
random `tile` x `tile` box per call, `calls` calls per run, best of `repeats` runs, both ways on
the same boxes. Then, each in a child process of its own, one decode of each kind for its peak
RSS (VmHWM, Linux), next to a child that only reads the file. Prints one JSON line.

Region decode reads the entropy-coded stream down to the tile's last row and no further, so a
tile near the top costs less than one near the bottom: region_top_ms and region_bottom_ms.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from data.region import available, decode_region

CHILD = """
import io, sys
import numpy as np
from PIL import Image
from data.region import decode_region
data = open(sys.argv[1], "rb").read()
box = tuple(int(v) for v in sys.argv[3].split(","))
x, y, w, h = box
if sys.argv[2] == "region":
    decode_region(data, box)
elif sys.argv[2] == "full":
    np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop((x, y, x + w, y + h)))
# This process's own peak (ru_maxrss would count the parent's pages at the fork too).
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def realistic_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth random texture (features ~1/40 and ~1/300 of the width) plus ±12 levels of
    noise, as JPEG quality 90, 4:2:0."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.int16)
    for cells, amplitude in ((8, 1.0), (60, 0.5)):
        small = rng.integers(0, 256, (max(2, cells * height // width), cells, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))
        image += (smooth * amplitude).astype(np.int16)
    image = image * 2 // 3 + rng.integers(-12, 13, image.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90, subsampling=2)
    return out.getvalue()


def full_then_crop(data: bytes, box: tuple[int, int, int, int]) -> np.ndarray:
    """What a loader without region decode does."""
    x, y, w, h = box
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop((x, y, x + w, y + h)))


def best_rate(decode, data: bytes, boxes: list, repeats: int) -> float:
    """Tiles per second, best of `repeats` runs over `boxes`."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for box in boxes:
            decode(data, box)
        best = min(best, time.perf_counter() - start)
    return len(boxes) / best


def peak_rss_mb(path: str, kind: str, box: tuple[int, int, int, int]) -> float:
    """Peak RSS in MB (VmHWM) of a child that reads the file and decodes it once (`kind` "none":
    reads only)."""
    code = [sys.executable, "-c", CHILD, path, kind, ",".join(map(str, box))]
    out = subprocess.run(code, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench_region: the {kind} child failed:\n{out.stderr[-3000:]}")
    return round(int(out.stdout.split()[-1]) / 1024, 1)  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=20.0, help="image size, 3:2 (20: 5472x3648)")
    parser.add_argument("--tile", type=int, default=256, help="tile side, pixels")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best counts")
    parser.add_argument("--calls", type=int, default=40, help="tiles (one decode each) per run")
    args = parser.parse_args()
    if not available():
        sys.exit("bench_region: no libjpeg-turbo 3 with the tj3 API here (pip install turbojpeg)")

    width = round(math.sqrt(args.megapixels * 1e6 * 3 / 2) / 16) * 16
    height = round(width * 2 / 3)
    data = realistic_jpeg(width, height)
    rng = np.random.default_rng(1)
    corners = zip(
        rng.integers(0, width - args.tile + 1, args.calls),
        rng.integers(0, height - args.tile + 1, args.calls),
    )
    boxes = [(int(x), int(y), args.tile, args.tile) for x, y in corners]
    assert np.array_equal(decode_region(data, boxes[0]), full_then_crop(data, boxes[0]))

    region = best_rate(decode_region, data, boxes, args.repeats)
    full = best_rate(full_then_crop, data, boxes, args.repeats)
    middle_x = (width - args.tile) // 2
    top = best_rate(decode_region, data, [(middle_x, 0, args.tile, args.tile)] * 3, args.repeats)
    bottom_box = (middle_x, height - args.tile, args.tile, args.tile)
    bottom = best_rate(decode_region, data, [bottom_box] * 3, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.jpg")
        with open(path, "wb") as f:
            f.write(data)
        rss = {kind: peak_rss_mb(path, kind, bottom_box) for kind in ("none", "region", "full")}

    print(json.dumps({
        "image": f"{width}x{height}",
        "jpeg_mb": round(len(data) / 1e6, 2),
        "tile": args.tile,
        "tiles_per_s": {"region": round(region, 2), "full": round(full, 2)},
        "ratio": round(region / full, 2),
        "region_top_ms": round(1000 / top, 1),
        "region_bottom_ms": round(1000 / bottom, 1),
        "peak_rss_mb": {"read_only": rss["none"], "region": rss["region"], "full": rss["full"]},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
