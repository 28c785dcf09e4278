"""Region decode gives exactly the pixels of PIL's full decode then crop, for every subsampling and
box position; corrupt data and boxes outside the image raise ValueError; the PIL fallback agrees.

JPEGs are made in memory from pixel noise: neighbouring chroma samples differ strongly, so a
wrong upsampling neighbour at a region's edge shows as a large difference, not a rounding one.
"""

from __future__ import annotations

import io
import os
import re
import threading

import numpy as np
import pytest
from PIL import Image

from data import region
from data.region import UnsupportedJPEG, available, decode_region, jpeg_size

NO_TURBO = (
    "no libjpeg-turbo 3 with the tj3 API here (the turbojpeg wheel's bundled library or a system "
    "libturbojpeg 3): decode_region falls back to PIL"
)
turbo = pytest.mark.skipif(not available(), reason=NO_TURBO)

SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2, "gray": None}  # PIL's subsampling=
# Non-multiples of 16, one just past an iMCU boundary (34 = 2 x 16 + 2), narrower than an iMCU.
SIZES = [(203, 157), (34, 40), (64, 48), (17, 9), (3, 2)]


def make_jpeg(width: int, height: int, kind: str, seed: int = 0, **save) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    im, out = Image.fromarray(noise), io.BytesIO()
    if kind == "gray":
        im.convert("L").save(out, "JPEG", quality=90, **save)
    else:
        # bufsize: noise outgrows Pillow's default buffer for a progressive encode
        im.save(out, "JPEG", quality=90, subsampling=SUBSAMPLING[kind], bufsize=width * height * 4, **save)
    return out.getvalue()


def full_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def boxes(width: int, height: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Every edge and corner, unaligned x, 1-pixel boxes, the full image, and random boxes."""
    w, h = max(1, width // 3), max(1, height // 3)
    out = [
        (0, 0, width, height),
        (0, 0, w, h),
        (width - w, 0, w, h),
        (0, height - h, w, h),
        (width - w, height - h, w, h),
        (0, 0, width, 1),
        (0, height - 1, width, 1),
        (0, 0, 1, height),
        (width - 1, 0, 1, height),
        (0, 0, 1, 1),
        (width - 1, height - 1, 1, 1),
        (width // 2, height // 2, 1, 1),
    ]
    out += [(x, 0, min(w, width - x), height) for x in (1, 7, 8, 15, 16, 17, 31, 33) if x < width]
    rng = np.random.default_rng(seed)
    for _ in range(30):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        out.append((x, y, int(rng.integers(1, width - x + 1)), int(rng.integers(1, height - y + 1))))
    return out


def assert_same_pixels(data: bytes, box_list: list, decode=decode_region) -> None:
    full = full_decode(data)
    for x, y, w, h in box_list:
        got = decode(data, (x, y, w, h))
        assert got.shape == (h, w, 3) and got.dtype == np.uint8, (x, y, w, h)
        diff = np.abs(got.astype(int) - full[y : y + h, x : x + w]).max()
        assert diff == 0, f"box {(x, y, w, h)}: max difference {diff} from PIL's full decode"


@turbo
@pytest.mark.parametrize("kind", list(SUBSAMPLING))
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_region_is_pil_full_decode_then_crop(size, kind):
    assert_same_pixels(make_jpeg(*size, kind), boxes(*size))


@turbo
@pytest.mark.parametrize("kind", ["4:2:2", "4:2:0"])
def test_every_x_and_narrow_width_at_an_image_just_past_an_imcu(kind):
    """Upsampled chroma needs the neighbour columns; the last columns of a 34 px image make a
    region 2 px wide unless it is widened to a whole iMCU."""
    data = make_jpeg(34, 20, kind, seed=1)
    assert_same_pixels(data, [(x, 3, w, 5) for x in range(34) for w in (1, 2, 3, 16) if x + w <= 34])


@turbo
@pytest.mark.parametrize("kind", ["4:2:0", "gray"])
def test_progressive_and_restart_markers(kind):
    for save in ({"progressive": True}, {"restart_marker_blocks": 3}):
        assert_same_pixels(make_jpeg(203, 157, kind, seed=2, **save), boxes(203, 157, seed=2))


@turbo
def test_grayscale_comes_out_rgb_and_the_result_is_a_view():
    data = make_jpeg(100, 60, "gray")
    tile = decode_region(data, (20, 10, 30, 5))
    assert tile.shape == (5, 30, 3)
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all()
    assert tile.base is not None  # a view into the decoded region, a few columns wider


@turbo
def test_bytes_after_eoi_still_decode():
    """Such a stream is decoded down to its bottom row (to catch truncation): same pixels."""
    data = make_jpeg(64, 48, "4:2:0") + b"trailing bytes a camera appended"
    assert_same_pixels(data, boxes(64, 48))


@pytest.fixture(params=[True, False], ids=["turbo", "pil"])
def turbo_path(request, monkeypatch) -> bool:
    """Each test on both paths: libjpeg-turbo's region decode, and the PIL fallback."""
    if request.param and not available():
        pytest.skip(NO_TURBO)
    if not request.param:
        monkeypatch.setattr(region, "available", lambda: False)
    return request.param


def test_corrupt_data_raises_value_error(turbo_path):
    data = make_jpeg(203, 157, "4:2:0")
    damaged = {
        "half": data[: len(data) // 2],
        "all but EOI": data[:-2],
        "header only": data[:200],
        "random bytes": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "not a JPEG": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "empty": b"",
    }
    if not turbo_path:
        del damaged["all but EOI"]  # PIL decodes a stream that lacks only its EOI marker
    for name, bad in damaged.items():
        for box in [(0, 0, 16, 16), (100, 140, 16, 16)]:  # above the cut too: the whole stream counts
            with pytest.raises(ValueError, match="corrupt JPEG"):
                decode_region(bad, box)
                pytest.fail(f"{name}, box {box}: decoded")
    if turbo_path:
        with pytest.raises(ValueError, match="Premature end of JPEG file"):
            decode_region(damaged["half"], (0, 0, 16, 16))


@turbo
def test_a_valid_jpeg_decodes_after_a_corrupt_one():
    """A failed header read leaves a tj3 handle mid-header; the next call must not inherit it."""
    data = make_jpeg(64, 48, "4:2:0")
    for bad in (data[:200], b"\xff\xd8\xff\xc4 not huffman tables", data[: len(data) // 2]):
        with pytest.raises(ValueError):
            decode_region(bad, (0, 0, 8, 8))
        assert_same_pixels(data, [(0, 0, 64, 48), (17, 5, 20, 20)])


def test_box_outside_the_image_raises_naming_it(turbo_path):
    data = make_jpeg(64, 48, "4:4:4")
    for box in [(-1, 0, 8, 8), (0, -1, 8, 8), (60, 0, 5, 8), (0, 41, 8, 8), (0, 0, 0, 8), (0, 0, 8, 0)]:
        with pytest.raises(
            ValueError, match=re.escape(f"box (x, y, w, h)={box} is not inside the 64x48 image")
        ):
            decode_region(data, box)


@turbo
def test_cmyk_raises_unsupported_for_the_caller_to_use_pil():
    noise = np.random.default_rng(0).integers(0, 256, (40, 48, 4), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise, "CMYK").save(out, "JPEG", quality=90)
    with pytest.raises(UnsupportedJPEG, match="CMYK"):
        decode_region(out.getvalue(), (0, 0, 8, 8))
    assert issubclass(UnsupportedJPEG, ValueError)


def test_jpeg_size_reads_the_header(monkeypatch):
    data = make_jpeg(203, 157, "4:2:0")
    assert jpeg_size(data) == (203, 157)
    monkeypatch.setattr(region, "available", lambda: False)
    assert jpeg_size(data) == (203, 157)


@pytest.mark.parametrize("kind", list(SUBSAMPLING))
def test_pil_fallback_gives_the_same_pixels(kind, monkeypatch):
    monkeypatch.setattr(region, "available", lambda: False)
    data = make_jpeg(64, 48, kind)
    assert_same_pixels(data, boxes(64, 48))


@turbo
def test_one_handle_per_thread():
    data = make_jpeg(203, 157, "4:2:0")
    full, box_list = full_decode(data), boxes(203, 157)
    handles, failures = set(), []

    def work():
        for x, y, w, h in box_list * 3:
            if not np.array_equal(decode_region(data, (x, y, w, h)), full[y : y + h, x : x + w]):
                failures.append((x, y, w, h))
        handles.add(region._local.decompressor.handle)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(handles) == 4


@turbo
def test_a_forked_child_makes_its_own_handle():
    data = make_jpeg(64, 48, "4:2:0")
    parent = decode_region(data, (5, 5, 30, 30)).copy()
    parent_handle = region._local.decompressor.handle
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if it decoded the same pixels on a new handle
        try:
            same = np.array_equal(decode_region(data, (5, 5, 30, 30)), parent)
            fresh = region._local.decompressor.pid == os.getpid()
            os._exit(0 if same and fresh and region._local.decompressor.handle != parent_handle else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
