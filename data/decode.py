"""PIL-level decoding shared by the writer and the loader: no torch here, so writer processes
start fast.

High-bit-depth camera images (16-bit mono or colour PNG and TIFF; a 12-bit camera writes values
0-4095 into 16 bits) are scaled to 8 bits by a bit depth N, `value * 255 / (2^N - 1)` rounded,
never clipped: N is the data set's (`python -m data write --bit-depth N`, kept in dataset.json and
the model's spec), else the file's own (a PNG's sBIT chunk, else its 16 bits per sample). Pillow
reads 16-bit mono whole (mode I;16) but 16-bit colour as 8 bits, dropping the low byte, so deep
colour files decode with OpenCV, imported only for them.
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
from PIL import Image

from data.samples import BadSample

MAX_PIXELS = 64_000_000  # an image header claiming more is treated as a decompression bomb
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOURS = {0: 1, 2: 3, 3: 1, 4: 1, 6: 3}  # colour type → colour channels (alpha not counted)


def open_image(data: bytes) -> Image.Image:
    """Open lazily (header only) and refuse a decompression bomb before any pixel is decoded."""
    im = Image.open(io.BytesIO(data))
    if im.width * im.height > MAX_PIXELS:
        # A BadSample, so the loader counts bombs under a reason of their own.
        raise BadSample(f"image over the {MAX_PIXELS} pixel limit (decompression bomb)")
    return im


def decode_fully(data: bytes | Image.Image) -> Image.Image:
    """Open (or take the image opened) and decode every byte, at 1/8 scale where JPEG allows:
    proves a file readable for about a tenth of a full decode (the entropy decoding still covers
    the whole stream). The image's size is then the reduced one."""
    im = data if isinstance(data, Image.Image) else open_image(data)
    im.draft("RGB", (64, 64))
    im.load()
    return im


def decode_rgb(
    im: Image.Image, spare: float, data: bytes | None = None, bit_depth: int | None = None
) -> Image.Image:
    """Decode as 8-bit RGB, reduced by up to `spare` (how many times larger the region we need is
    than the output). JPEG reduces by 1/2, 1/4 or 1/8 inside the DCT, which skips most of the
    decode work; compare the result's size with the header's to map coordinates. A deep image
    (`data`: its file's bytes, else read from where PIL opened it) is scaled by `bit_depth`, else
    by its own depth (see the module's docstring); BadSample if a value is over that depth's top."""
    if data is None and im.format in ("PNG", "TIFF"):
        data = source_bytes(im)
    if container_bits(im, data) > 8:
        pixels = to_8bit(levels(im, data), bit_depth or own_depth(im, data))
        return Image.fromarray(pixels).convert("RGB")  # grey (H, W) → RGB, as PIL converts L
    if spare >= 2 and im.format == "JPEG":
        im.draft("RGB", (math.ceil(im.width / spare), math.ceil(im.height / spare)))
    return im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy an RGB frame


def container_bits(im: Image.Image, data: bytes | None = None) -> int:
    """Bits per sample the file holds: 8 for ordinary images, 16 for 16-bit PNG and TIFF."""
    if im.mode.startswith("I;16"):
        return 16
    if im.mode not in ("I", "RGB", "RGBA", "LA"):
        return 8  # L, P, 1, CMYK, ... and F (float TIFF, converted by PIL as ever)
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 8)  # BitsPerSample: one per channel
        return max(bits) if isinstance(bits, tuple) else int(bits)
    if im.format == "PNG" and data:
        return _png_bits(data)[0]
    return 16 if im.mode == "I" else 8  # an I image made in memory: taken as 16-bit values


def own_depth(im: Image.Image, data: bytes | None = None) -> int:
    """The depth a deep file declares (a PNG's sBIT chunk), else its container's bits."""
    declared = _png_bits(data)[1] if im.format == "PNG" and data else None
    return declared or container_bits(im, data)


def levels(im: Image.Image, data: bytes | None = None) -> np.ndarray:
    """A deep image's raw values: (H, W) for mono, (H, W, 3) RGB for colour (alpha dropped),
    uint16 (int32 for 32-bit integer TIFF)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im)
    if data is None:
        raise ValueError(
            "a 16-bit colour image PIL has read as 8 bits: give its file (path or bytes) or a uint16 "
            "array instead"
        )
    import cv2  # only deep colour files need it: Pillow has no 16-bit RGB mode

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("OpenCV cannot decode this 16-bit image")
    return pixels if pixels.ndim == 2 else pixels[..., 2::-1]  # BGR(A) → RGB


def to_8bit(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 `values * 255 / (2^bits - 1)`, rounded half up, of the same shape; BadSample when a
    value is outside 0 .. 2^bits - 1 (a wrong bit depth: clipping would hide it)."""
    top = (1 << bits) - 1
    if values.size and (int(values.max()) > top or int(values.min()) < 0):
        raise BadSample(f"pixel values over {top}, the top of {bits} bits")
    wide = values.astype(np.uint32 if bits <= 16 else np.uint64)  # 65535 * 510 fits in 32 bits
    return ((wide * 510 + top) // (2 * top)).astype(np.uint8)


def source_bytes(im: Image.Image) -> bytes | None:
    """The bytes PIL opened `im` from (a BytesIO, or a file by name), or None (made in memory)."""
    fp = getattr(im, "fp", None)
    if hasattr(fp, "getvalue"):
        return fp.getvalue()
    name = getattr(im, "filename", "")
    if name:
        with open(name, "rb") as f:
            return f.read()
    return None


def _png_bits(data: bytes) -> tuple[int, int | None]:
    """(bits per sample from IHDR, significant bits from sBIT or None) of a PNG's bytes.

    chunk: length (4 B, big-endian) | type (4 B) | data | CRC (4 B); IHDR first (bit depth at
    byte 8 of its data, colour type at 9), sBIT (one byte per channel) before the first IDAT."""
    if not data.startswith(PNG_SIGNATURE):
        return 8, None
    bits, colours, pos = 8, 1, len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 10:
            bits, colours = body[8], PNG_COLOURS.get(body[9], 1)
        elif kind == b"sBIT" and body:
            declared = max(body[:colours])
            return bits, declared if 0 < declared <= bits else None
        elif kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return bits, None
