"""PIL-level decoding shared by the writer and the loader: no torch here, so writer processes
start fast."""

from __future__ import annotations

import io
import math

from PIL import Image

from data.samples import BadSample

MAX_PIXELS = 64_000_000  # an image header claiming more is treated as a decompression bomb


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


def decode_rgb(im: Image.Image, spare: float) -> Image.Image:
    """Decode as RGB, reduced by up to `spare` (how many times larger the region we need is than
    the output). JPEG reduces by 1/2, 1/4 or 1/8 inside the DCT, which skips most of the decode
    work; compare the result's size with the header's to map coordinates."""
    if spare >= 2 and im.format == "JPEG":
        im.draft("RGB", (math.ceil(im.width / spare), math.ceil(im.height / spare)))
    return im.convert("RGB")
