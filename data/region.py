"""Decode one region of a JPEG: the pixels of a tile without the rest of a 20-50 MP image.

libjpeg-turbo 3's TurboJPEG API (through ctypes) skips the inverse DCT, upsampling and colour
conversion outside the region and never allocates the full image. The entropy decoding still
reads the stream from its start down to the region's last row (Huffman codes have no random
access): at 20 MP a tile at the bottom costs about a third of a full decode, one at the top a
few percent. Pixels are the same as PIL's full decode then crop (Pillow decodes with
libjpeg-turbo too, islow DCT and fancy upsampling, as here).

    box (x, y, w, h) ──widen──▶ decoded region: x down to an iMCU column (TurboJPEG crops on
                                those only), 1 px more on each side, at least one iMCU wide
                     ──slice──▶ (h, w, 3) uint8 RGB view of it

The library is the one the `turbojpeg` wheel bundles (turbojpeg.libs/libturbojpeg-*.so), else
a system libturbojpeg with the tj3 API; without either, `decode_region` decodes with PIL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import io
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (x, y, w, h), pixels of the full image

# turbojpeg.h, libjpeg-turbo 3
_INIT_DECOMPRESS = 1
_PARAM_STOPONWARNING, _PARAM_SUBSAMP, _PARAM_JPEGWIDTH, _PARAM_JPEGHEIGHT, _PARAM_COLORSPACE = 0, 4, 5, 6, 8
_PF_RGB = 0
_CS_CMYK, _CS_YCCK = 3, 4
_ERR_WARNING = 0
_EOI = b"\xff\xd9"  # the marker that ends a JPEG stream
# tjMCUWidth: iMCU width in pixels per TJSAMP_* (444, 422, 420, gray, 440, 411, 441); a crop's
# left edge must sit on one. TJSAMP_UNKNOWN (-1) is an unusual sampling TurboJPEG cannot crop.
_IMCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)


class UnsupportedJPEG(ValueError):
    """A readable JPEG this decoder does not handle (CMYK or YCCK, unusual subsampling): decode
    it with PIL instead. Every other ValueError from here means corrupt data or a bad box."""


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


def _candidates() -> list[str]:
    """The `turbojpeg` wheel's bundled library first (found without importing its module), then
    the system's."""
    paths = []
    spec = importlib.util.find_spec("turbojpeg")
    if spec is not None and spec.origin:
        paths += sorted(str(p) for p in Path(spec.origin).parent.glob("turbojpeg.libs/libturbojpeg*.so*"))
    system = ctypes.util.find_library("turbojpeg")
    if system:
        paths.append(system)
    return paths


def _open_library() -> ctypes.CDLL | None:
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if not hasattr(lib, "tj3Init"):  # libjpeg-turbo 2's library has only the tj (v2) API
            continue
        handle, c_int, c_size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.tj3Init.argtypes, lib.tj3Init.restype = [c_int], handle
        lib.tj3Destroy.argtypes, lib.tj3Destroy.restype = [handle], None
        lib.tj3Set.argtypes, lib.tj3Set.restype = [handle, c_int, c_int], c_int
        lib.tj3Get.argtypes, lib.tj3Get.restype = [handle, c_int], c_int
        lib.tj3DecompressHeader.argtypes, lib.tj3DecompressHeader.restype = [handle, handle, c_size], c_int
        lib.tj3SetCroppingRegion.argtypes, lib.tj3SetCroppingRegion.restype = [handle, _Region], c_int
        lib.tj3Decompress8.argtypes = [handle, handle, c_size, handle, c_int, c_int]
        lib.tj3Decompress8.restype = c_int
        lib.tj3GetErrorStr.argtypes, lib.tj3GetErrorStr.restype = [handle], ctypes.c_char_p
        lib.tj3GetErrorCode.argtypes, lib.tj3GetErrorCode.restype = [handle], c_int
        return lib
    return None


_lib: ctypes.CDLL | None = None
_lib_loaded = False
_lib_lock = threading.Lock()
_local = threading.local()  # .decompressor: this thread's _Decompressor


def _library() -> ctypes.CDLL | None:
    """Loaded on first use, once per process (a forked child inherits it, still valid)."""
    global _lib, _lib_loaded
    if not _lib_loaded:
        with _lib_lock:
            if not _lib_loaded:
                _lib, _lib_loaded = _open_library(), True
    return _lib


class _Decompressor:
    """One tj3 handle. Handles are not thread-safe, so each thread has its own, and a forked
    child makes new ones rather than share its parent's state."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.pid, self.handle = lib, os.getpid(), None
        self._open()

    def _open(self) -> None:
        self.handle = self.lib.tj3Init(_INIT_DECOMPRESS)
        if not self.handle:
            raise RuntimeError("data.region: tj3Init failed (out of memory?)")
        # A warning (truncated data, a corrupt entropy segment) stops the decode at once: the
        # call fails, as PIL's load fails on a truncated file, and the sample counts as bad.
        self.lib.tj3Set(self.handle, _PARAM_STOPONWARNING, 1)

    def __del__(self):
        # A child's copy of its parent's handle is left alone: another parent thread may have
        # been inside it at the fork.
        if self.handle and self.pid == os.getpid():
            self.lib.tj3Destroy(self.handle)

    def check(self, status: int, what: str) -> None:
        """Raise ValueError with libjpeg-turbo's message if a call failed, on a fresh handle: a
        failed tj3DecompressHeader leaves its handle mid-header, so the next, valid JPEG would
        fail too ("Bogus Huffman table definition")."""
        if status == 0:
            return
        kind = "warning" if self.lib.tj3GetErrorCode(self.handle) == _ERR_WARNING else "error"
        text = (self.lib.tj3GetErrorStr(self.handle) or b"").decode(errors="replace").strip()
        self.lib.tj3Destroy(self.handle)
        self._open()
        raise ValueError(f"corrupt JPEG: {what}: libjpeg-turbo {kind}: {text}")

    def header(self, buf: np.ndarray) -> tuple[int, int, int, int]:
        """(width, height, TJSAMP_*, TJCS_*) of the JPEG in `buf`, which the decode then reads."""
        if buf.size == 0:
            raise ValueError("corrupt JPEG: 0 bytes")
        self.check(self.lib.tj3DecompressHeader(self.handle, buf.ctypes.data, buf.size), "header")
        return tuple(
            self.lib.tj3Get(self.handle, p)
            for p in (_PARAM_JPEGWIDTH, _PARAM_JPEGHEIGHT, _PARAM_SUBSAMP, _PARAM_COLORSPACE)
        )


def available() -> bool:
    """Whether region decode runs here; when not, `decode_region` decodes the whole image with PIL."""
    return _library() is not None


def _decompressor() -> _Decompressor:
    """This thread's handle (after `available()`); a forked child's first call makes its own."""
    d = getattr(_local, "decompressor", None)
    if d is None or d.pid != os.getpid():
        d = _local.decompressor = _Decompressor(_library())
    return d


def _buffer(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)  # no copy; any bytes-like object


def _check_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    x, y, w, h = (int(v) for v in box)
    if not (x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= width and y + h <= height):
        raise ValueError(
            f"box (x, y, w, h)={tuple(box)} is not inside the {width}x{height} image: expected "
            f"x, y >= 0, w, h >= 1, x + w <= {width}, y + h <= {height}"
        )
    return x, y, w, h


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; ValueError if that is not a readable JPEG header."""
    if not available():
        try:
            return Image.open(io.BytesIO(data)).size
        except OSError as e:
            raise ValueError(f"corrupt JPEG: header: {e}") from e
    return _decompressor().header(_buffer(data))[:2]


def decode_region(data: bytes, box: Box) -> np.ndarray:
    """The (h, w, 3) uint8 RGB pixels of `box` = (x, y, w, h), image pixels, inside the image of
    the JPEG `data` (grayscale comes out as RGB too): the same values as PIL's full decode then
    crop.

    The result is a view into a slightly larger buffer (a few more columns, at most two iMCUs,
    16-64 px; for a stream without EOI also the rows below), so not C-contiguous:
    np.ascontiguousarray it where that matters.

    Raises ValueError for corrupt data (libjpeg-turbo's warnings too, truncated data among them)
    or a box outside the image, and UnsupportedJPEG, a ValueError, for CMYK/YCCK or an unusual
    subsampling. Without `available()`, PIL decodes the whole image and crops it (a new array).
    """
    if not available():
        return _decode_region_pil(data, box)
    d, buf = _decompressor(), _buffer(data)
    width, height, subsamp, colorspace = d.header(buf)
    x, y, w, h = _check_box(box, width, height)
    if colorspace in (_CS_CMYK, _CS_YCCK):
        name = "CMYK" if colorspace == _CS_CMYK else "YCCK"
        raise UnsupportedJPEG(f"JPEG colorspace {name}: decode it with PIL")
    if not 0 <= subsamp < len(_IMCU_WIDTH):
        raise UnsupportedJPEG(f"JPEG of an unusual chroma subsampling (TJSAMP {subsamp}): decode it with PIL")
    # Fancy upsampling of subsampled chroma treats the region's left and right edges as the
    # image's (it replicates the edge sample there), and a region 1 chroma sample wide gets plain
    # box upsampling (jpeg_crop_scanline re-initialises the upsampler), so: 1 px of context on
    # each side inside the image, and at least one iMCU wide. Rows need nothing: libjpeg-turbo
    # keeps the chroma rows above and below a cropped region as context, as in a full decode.
    imcu = _IMCU_WIDTH[subsamp]
    x0 = max(x - 1, 0) // imcu * imcu
    x1 = min(max(x + w + 1, x0 + imcu), width)
    if x1 - x0 < imcu:  # a box at the right edge of an image that ends just past an iMCU boundary
        x0 = max(x1 - imcu, 0) // imcu * imcu
    # libjpeg-turbo reads no further than the region's last row, so a box above the point where
    # a file was cut would decode. A stream that does not end in EOI (truncated, or with bytes
    # after its EOI) is decoded to the bottom row instead, so that truncation anywhere raises,
    # as with PIL's full decode; the strip costs little next to the entropy decoding.
    rows = h if buf[-2:].tobytes() == _EOI else height - y
    out = np.empty((rows, x1 - x0, 3), dtype=np.uint8)  # (rows, columns, RGB), the only allocation
    d.check(d.lib.tj3SetCroppingRegion(d.handle, _Region(x0, y, x1 - x0, rows)), f"crop {box}")
    # The scaling factor stays at its default 1/1, which the crop's iMCU alignment assumes.
    d.check(d.lib.tj3Decompress8(d.handle, buf.ctypes.data, buf.size, out.ctypes.data, 0, _PF_RGB), "decode")
    return out[:h, x - x0 : x - x0 + w]


def _decode_region_pil(data: bytes, box: Box) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))
        x, y, w, h = _check_box(box, *im.size)
        # Cropping before converting gives the same pixels as after (conversion is per pixel)
        # for less work; the crop still decodes the whole image.
        return np.array(im.crop((x, y, x + w, y + h)).convert("RGB"))
    except OSError as e:  # PIL's corrupt and truncated data
        raise ValueError(f"corrupt JPEG: {e}") from e
